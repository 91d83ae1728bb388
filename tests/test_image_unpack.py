"""Unpacking layer tars: what a layer holds comes out exactly, and hostile
or broken tars are refused with a message naming the entry, writing nothing
outside the layer directory."""

import io
import os
import stat
import tarfile

import pytest

from image_helpers import CHR, D, F, FIFO, H, L, MTIME, layer_tar
from unionfs.errors import UserError
from unionfs.image.unpack import unpack_layer

IS_ROOT = os.geteuid() == 0


def unpack(tmp_path, tar: bytes, warnings=None):
    dest = tmp_path / "layer"
    dest.mkdir()
    warn = (warnings.append if warnings is not None else lambda m: None)
    unpack_layer(io.BytesIO(tar), str(dest), "layer sha256:test", warn)
    return dest


def test_metadata_is_preserved(tmp_path):
    tar = layer_tar(
        D("etc", mode=0o751, uid=12, gid=34, mtime=MTIME - 5),
        F("etc/conf", b"x=1\n", mode=0o4755, uid=12, gid=34, mtime=MTIME - 10,
          xattrs={"user.origin": "test"}),
        L("etc/link", "conf", uid=5, gid=6, mtime=MTIME - 20),
        H("etc/hard", "etc/conf"),
        FIFO("etc/fifo", mode=0o640),
        D("ro", mode=0o555),
        F("ro/inside", b"y"),
    )
    root = unpack(tmp_path, tar)
    st = os.lstat(root / "etc/conf")
    assert (root / "etc/conf").read_bytes() == b"x=1\n"
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert int(st.st_mtime) == MTIME - 10
    assert os.getxattr(root / "etc/conf", "user.origin") == b"test"
    assert os.readlink(root / "etc/link") == "conf"
    assert int(os.lstat(root / "etc/link").st_mtime) == MTIME - 20
    assert os.lstat(root / "etc/hard").st_ino == st.st_ino and st.st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(root / "etc/fifo").st_mode)
    assert stat.S_IMODE(os.lstat(root / "etc/fifo").st_mode) == 0o640
    dst = os.lstat(root / "etc")
    assert stat.S_IMODE(dst.st_mode) == 0o751 and int(dst.st_mtime) == MTIME - 5
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (12, 34)
        assert (os.lstat(root / "etc/link").st_uid, os.lstat(root / "etc/link").st_gid) == (5, 6)


def test_whiteouts_are_kept_as_files(tmp_path):
    root = unpack(tmp_path, layer_tar(D("a"), F("a/.wh..wh..opq"), F(".wh.gone")))
    assert (root / "a/.wh..wh..opq").is_file() and (root / ".wh.gone").is_file()


def test_parents_are_created_and_later_dir_entries_apply(tmp_path):
    root = unpack(tmp_path, layer_tar(F("x/y/z", b"1"), D("x", mode=0o700, mtime=MTIME - 1)))
    assert (root / "x/y/z").read_bytes() == b"1"
    assert stat.S_IMODE(os.lstat(root / "x").st_mode) == 0o700
    assert int(os.lstat(root / "x").st_mtime) == MTIME - 1


def can_make_device_nodes(where) -> bool:
    """Whether this process may create a device node here (root outside a
    user namespace; a container may still deny it). Probed on a fresh path."""
    probe = where / "mknod-probe"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        return False
    os.unlink(probe)
    return True


def test_device_nodes(tmp_path):
    warnings = []
    allowed = can_make_device_nodes(tmp_path)
    root = unpack(tmp_path, layer_tar(CHR("null", 1, 3), CHR("zero", 1, 5), F("after", b"")), warnings)
    assert (root / "after").exists()
    if allowed:
        assert warnings == []
        for name, (major, minor) in {"null": (1, 3), "zero": (1, 5)}.items():
            st = os.lstat(root / name)
            assert stat.S_ISCHR(st.st_mode), name
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor), name
            assert stat.S_IMODE(st.st_mode) == 0o600, name
    else:
        assert not (root / "null").exists() and len(warnings) == 1
        assert '"null"' in warnings[0]


def test_empty_blob_is_an_empty_layer(tmp_path):
    root = unpack(tmp_path, b"")
    assert os.listdir(root) == []


# Hostile entries, each aimed at the sentinel directory beside the layer:
# (id, function of the sentinel's absolute path -> (tar, expected message)).
# Relative escapes climb out of tmp_path/layer into tmp_path/sentinel.
HOSTILE = [
    ("absolute", lambda s: (layer_tar(F(f"{s}/passwd", b"x")), f'"{s}/passwd" is an absolute path')),
    ("dotdot", lambda s: (layer_tar(F("../sentinel/passwd", b"x")), '"../sentinel/passwd" escapes the layer')),
    ("dotdot-inner", lambda s: (layer_tar(F("a/../../sentinel/x", b"x")),
                                '"a/../../sentinel/x" escapes the layer')),
    ("symlink-parent", lambda s: (layer_tar(L("a", s), F("a/passwd", b"x")),
                                  '"a/passwd" goes through "a", which is a symlink')),
    ("symlink-rel", lambda s: (layer_tar(L("up", "../sentinel"), F("up/escaped", b"x")),
                               '"up/escaped" goes through "up", which is a symlink')),
    ("symlink-dir-entry", lambda s: (layer_tar(L("d", s), D("d/sub")), '"d/sub" goes through "d"')),
    ("file-parent", lambda s: (layer_tar(F("f", b""), F("f/x", b"")),
                               '"f/x" goes through "f", which is not a directory')),
    ("hardlink-abs", lambda s: (layer_tar(H("h", f"{s}/passwd")),
                                f'"h" is a hardlink to "{s}/passwd", which points outside')),
    ("hardlink-dotdot", lambda s: (layer_tar(H("h", "../sentinel/passwd")),
                                   '"h" is a hardlink to "../sentinel/passwd"')),
    ("hardlink-missing", lambda s: (layer_tar(H("h", "not/here")), '"h" is a hardlink to "not/here"')),
    ("hardlink-dir", lambda s: (layer_tar(D("d"), H("h", "d")), '"h" is a hardlink to "d"')),
    ("hardlink-via-symlink", lambda s: (layer_tar(L("s", s), H("h", "s/passwd")),
                                        '"h" is a hardlink to "s/passwd"')),
    ("duplicate-file", lambda s: (layer_tar(F("a", b"1"), F("a", b"2")), '"a" appears twice')),
    ("duplicate-normalized", lambda s: (layer_tar(F("a/b", b"1"), F("./a//b", b"2")), '"./a//b" appears twice')),
    ("duplicate-dir", lambda s: (layer_tar(D("d"), D("d/")), 'appears twice')),
    ("file-over-implicit-dir", lambda s: (layer_tar(F("d/x", b""), F("d", b"")), '"d" is not a directory, but earlier')),
    ("root-not-dir", lambda s: (layer_tar(F("./", b"")), 'names the layer root')),
]


def sentinel_state(tmp_path):
    """What a write outside the layer would change: tmp_path's names, and
    the sentinel directory's entries (inode, links, size, mtime, content)."""
    sentinel = tmp_path / "sentinel"
    entries = {}
    for p in [sentinel, *sorted(sentinel.iterdir())]:
        st = os.lstat(p)
        entries[p.name] = (st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns,
                           p.read_bytes() if p.is_file() else None)
    return sorted(os.listdir(tmp_path)), entries


@pytest.mark.parametrize("case,build", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_entries_are_refused(tmp_path, case, build):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "passwd").write_text("sentinel\n")
    tar, message = build(str(sentinel))
    before = sentinel_state(tmp_path)
    with pytest.raises(UserError) as e:
        unpack(tmp_path, tar)
    assert message in str(e.value)
    assert str(e.value).startswith("layer sha256:test: ")
    names, entries = sentinel_state(tmp_path)
    assert names == sorted(before[0] + ["layer"])         # nothing new beside the layer
    assert entries == before[1], "the sentinel outside the layer changed"


def test_nothing_written_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    tar = layer_tar(L("a", str(victim)), F("a/planted", b"x"))
    with pytest.raises(UserError):
        unpack(tmp_path, tar)
    assert os.listdir(victim) == []


def _corrupt_second_header(tar: bytes) -> bytes:
    # Entry 1 is one header + one data block; damage the second header's checksum field.
    b = bytearray(tar)
    second = 1024
    b[second + 148:second + 156] = b"9999999\0"
    return bytes(b)


def test_malformed_header_after_an_entry(tmp_path):
    tar = layer_tar(F("a", b"1"), F("b", b"2"))
    with pytest.raises(UserError) as e:
        unpack(tmp_path, _corrupt_second_header(tar))
    assert 'after entry "a"' in str(e.value)


def test_truncated_data(tmp_path):
    tar = layer_tar(F("big", b"z" * 5000))
    with pytest.raises(UserError) as e:
        unpack(tmp_path, tar[:512 + 1024])
    assert '"big"' in str(e.value)


def test_garbage_after_end_of_archive(tmp_path):
    tar = layer_tar(F("a", b"1"))
    with pytest.raises(UserError) as e:
        unpack(tmp_path, tar + b"garbage" * 100)
    assert "malformed" in str(e.value)


def test_not_a_tar(tmp_path):
    with pytest.raises(UserError) as e:
        unpack(tmp_path, b"this is not a tar archive at all" * 40)
    assert "layer sha256:test" in str(e.value)


def test_unsupported_type(tmp_path):
    ti = tarfile.TarInfo("sock")
    ti.type = b"Z"
    with pytest.raises(UserError) as e:
        unpack(tmp_path, layer_tar((ti, None)))
    assert '"sock"' in str(e.value)
