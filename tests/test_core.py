"""Unit tests of the union's semantic core, on plain directories (no FUSE)."""

import errno
import os
import stat

import pytest

from conftest import write
from unionfs import whiteout as wh
from unionfs.union import WORK_SUBDIR, Union

IS_ROOT = os.geteuid() == 0
FORMATS = [pytest.param(wh.FORMAT_OVERLAY, marks=pytest.mark.skipif(
    not IS_ROOT, reason="overlay whiteouts need CAP_MKNOD")), wh.FORMAT_OCI]


def dev_whiteout(path):
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


@pytest.fixture
def tree(tmp_path):
    """l0 (top lower) over l1 (bottom), with an upper and a work dir."""
    d = {n: tmp_path / n for n in ("l0", "l1", "upper", "work")}
    for p in d.values():
        p.mkdir()
    return d


def make_union(tree, fmt=wh.FORMAT_OCI, upper=True):
    return Union([str(tree["l0"]), str(tree["l1"])],
                 str(tree["upper"]) if upper else None,
                 str(tree["work"]) if upper else None, whiteout=fmt)


def names(u, path="/"):
    return sorted(n for n, _, _ in u.listdir(path))


def read(u, path):
    fd = u.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20).decode()
    finally:
        os.close(fd)


# -- lookup -------------------------------------------------------------------

def test_top_most_entry_wins(tree):
    write(tree["l1"] / "f", "bottom")
    write(tree["l0"] / "f", "top")
    u = make_union(tree)
    assert read(u, "/f") == "top"


@pytest.mark.parametrize("marker", ["device", "oci"])
def test_whiteout_in_lower_hides_below(tree, marker):
    if marker == "device" and not IS_ROOT:
        pytest.skip("device whiteouts need CAP_MKNOD")
    write(tree["l1"] / "gone", "x")
    write(tree["l1"] / "kept", "y")
    if marker == "device":
        dev_whiteout(tree["l0"] / "gone")
    else:
        write(tree["l0"] / ".wh.gone")
    u = make_union(tree)
    assert u.stack.lookup("/gone") is None
    assert names(u) == ["kept"]


@pytest.mark.parametrize("marker", ["xattr", "oci"])
def test_opaque_dir_hides_lower_contents(tree, marker):
    write(tree["l1"] / "d" / "old", "x")
    (tree["l0"] / "d").mkdir()
    write(tree["l0"] / "d" / "new", "y")
    if marker == "xattr":
        name = "trusted.overlay.opaque" if IS_ROOT else "user.overlay.opaque"
        os.setxattr(tree["l0"] / "d", name, b"y")
    else:
        write(tree["l0"] / "d" / wh.WH_OPAQUE)
    u = make_union(tree)
    assert names(u, "/d") == ["new"]
    assert u.stack.lookup("/d/old") is None


def test_directories_merge_and_nondir_hides_below(tree):
    write(tree["l1"] / "d" / "a", "1")
    write(tree["l0"] / "d" / "b", "2")
    write(tree["l1"] / "x" / "inner", "hidden")
    write(tree["l0"] / "x", "file above dir")
    u = make_union(tree)
    assert names(u, "/d") == ["a", "b"]
    assert u.node("/x").kind == "n"
    with pytest.raises(OSError) as e:
        u.stack.lookup("/x/inner")
    assert e.value.errno == errno.ENOTDIR


def test_dir_above_hides_nondir_below(tree):
    write(tree["l1"] / "x", "file")
    (tree["l0"] / "x").mkdir()
    u = make_union(tree)
    node = u.node("/x")
    assert node.kind == "d" and len(node.layers) == 1


def test_symlink_inside_layer_is_never_followed(tree, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret", "host data")
    os.symlink(str(outside), tree["l0"] / "link")       # absolute, to the host
    os.symlink("../../outside", tree["l1"] / "rel")
    u = make_union(tree)
    for p in ("/link/secret", "/rel/secret"):
        with pytest.raises(OSError) as e:
            u.stack.lookup(p)
        assert e.value.errno == errno.ENOTDIR
    assert u.readlink("/link") == str(outside)


def test_readdir_hides_markers_and_has_no_duplicates(tree):
    for layer in ("l0", "l1"):
        write(tree[layer] / "same", layer)
    write(tree["l1"] / "d" / "x")
    write(tree["l0"] / "d" / "y")
    write(tree["l0"] / ".wh.nothing")
    write(tree["l0"] / "d" / wh.WH_OPAQUE)
    u = make_union(tree)
    assert names(u) == ["d", "same"]
    assert names(u, "/d") == ["y"]


# -- copy-up ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_write_copies_up_with_metadata(tree, fmt):
    f = tree["l1"] / "dir" / "sub" / "file"
    write(f, "lower data", mode=0o640)
    os.chmod(tree["l1"] / "dir", 0o751)
    os.setxattr(f, "user.note", b"kept")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    os.utime(tree["l1"] / "dir", ns=(3_000_000_000, 4_000_000_000))
    if IS_ROOT:
        os.chown(f, 1234, 5678)
    u = make_union(tree, fmt)
    fd = u.open("/dir/sub/file", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+more")
    os.close(fd)
    up = tree["upper"] / "dir" / "sub" / "file"
    assert up.read_text() == "lower data+more"
    assert f.read_text() == "lower data"                 # lower untouched
    st = os.lstat(up)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert os.getxattr(up, "user.note") == b"kept"
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    pst = os.lstat(tree["upper"] / "dir")
    assert stat.S_IMODE(pst.st_mode) == 0o751           # parents keep theirs
    assert pst.st_mtime_ns == 4_000_000_000              # copy-up is not a change
    assert os.listdir(tree["work"] / WORK_SUBDIR) == []  # no temporaries left


def test_copy_up_keeps_symlinks_fifos_and_holes(tree):
    os.symlink("target/that/does/not/exist", tree["l1"] / "ln")
    os.mkfifo(tree["l1"] / "fifo", 0o600)
    with open(tree["l1"] / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    u = make_union(tree)
    for p in ("/ln", "/fifo", "/sparse"):
        u.copyup.copy_up(p)
    assert os.readlink(tree["upper"] / "ln") == "target/that/does/not/exist"
    assert stat.S_ISFIFO(os.lstat(tree["upper"] / "fifo").st_mode)
    st = os.lstat(tree["upper"] / "sparse")
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 8 << 20                  # holes stayed holes
    with open(tree["upper"] / "sparse", "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"


def test_open_with_trunc_copies_no_data(tree):
    write(tree["l1"] / "big", "x" * 100000)
    u = make_union(tree)
    fd = u.open("/big", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert (tree["upper"] / "big").stat().st_size == 0


def test_leftovers_in_work_are_removed_at_start(tree):
    work = tree["work"] / WORK_SUBDIR
    work.mkdir()
    write(work / "#dead.1", "torn copy")
    (work / "#dead.2").mkdir()
    make_union(tree)
    assert os.listdir(work) == []


def test_read_only_union_refuses_writes(tree):
    write(tree["l1"] / "f", "x")
    u = make_union(tree, upper=False)
    with pytest.raises(OSError) as e:
        u.open("/f", os.O_WRONLY)
    assert e.value.errno == errno.EROFS


# -- names ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_unlink_lower_leaves_whiteout(tree, fmt):
    write(tree["l1"] / "f", "x")
    write(tree["l1"] / "g", "y")
    u = make_union(tree, fmt)
    u.unlink("/f")
    assert names(u) == ["g"]
    if fmt == wh.FORMAT_OVERLAY:
        st = os.lstat(tree["upper"] / "f")                # overlayfs: a 0/0 char device
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
    else:
        assert (tree["upper"] / ".wh.f").exists()
    # A fresh union over the same dirs sees the same thing.
    assert names(make_union(tree, fmt)) == ["g"]


def test_unlink_upper_only_leaves_no_whiteout(tree):
    u = make_union(tree)
    fd = u.create("/new", 0o644, os.O_WRONLY, None)
    os.close(fd)
    u.unlink("/new")
    assert os.listdir(tree["upper"]) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_rmdir(tree, fmt):
    write(tree["l1"] / "d" / "f", "x")
    u = make_union(tree, fmt)
    with pytest.raises(OSError) as e:
        u.rmdir("/d")
    assert e.value.errno == errno.ENOTEMPTY
    u.unlink("/d/f")
    u.rmdir("/d")
    assert names(u) == []
    assert names(make_union(tree, fmt)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_mkdir_over_whiteout_is_opaque(tree, fmt):
    write(tree["l1"] / "d" / "old", "x")
    u = make_union(tree, fmt)
    u.unlink("/d/old")
    u.rmdir("/d")
    u.mkdir("/d", 0o755)
    assert names(u, "/d") == []
    assert names(make_union(tree, fmt), "/d") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_create_over_whiteout_replaces_it(tree, fmt):
    write(tree["l1"] / "f", "old")
    u = make_union(tree, fmt)
    u.unlink("/f")
    fd = u.create("/f", 0o600, os.O_WRONLY, None)
    os.write(fd, b"new")
    os.close(fd)
    assert read(u, "/f") == "new"
    assert sorted(os.listdir(tree["upper"])) == ["f"]   # no marker left
    assert read(make_union(tree, fmt), "/f") == "new"


def test_reserved_and_long_names(tree):
    u = make_union(tree)
    with pytest.raises(OSError) as e:
        u.create("/.wh.x", 0o644, os.O_WRONLY, None)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        u.mkdir("/" + "n" * 256, 0o755)
    assert e.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize("fmt", FORMATS)
def test_rename_lower_directory_moves_whole_tree(tree, fmt):
    write(tree["l1"] / "src" / "a", "A")
    write(tree["l0"] / "src" / "sub" / "b", "B")
    write(tree["l1"] / "dst" / "stale", "must not show")
    u = make_union(tree, fmt)
    u.unlink("/dst/stale")
    u.rename("/src", "/dst")
    assert names(u) == ["dst"]
    assert names(u, "/dst") == ["a", "sub"]
    assert read(u, "/dst/sub/b") == "B"
    fresh = make_union(tree, fmt)
    assert names(fresh) == ["dst"]
    assert names(fresh, "/dst") == ["a", "sub"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rename_file_over_existing(tree, fmt):
    write(tree["l1"] / "a", "A")
    write(tree["l0"] / "b", "B")
    u = make_union(tree, fmt)
    u.rename("/a", "/b")
    assert names(u) == ["b"]
    assert read(u, "/b") == "A"
    assert names(make_union(tree, fmt)) == ["b"]


def test_rename_errors(tree):
    write(tree["l1"] / "d" / "x", "1")
    write(tree["l1"] / "e" / "y", "2")
    write(tree["l1"] / "f", "3")
    u = make_union(tree)
    cases = [("/d", "/e", errno.ENOTEMPTY), ("/d", "/f", errno.ENOTDIR),
             ("/f", "/d", errno.EISDIR), ("/d", "/d/x/z", errno.EINVAL),
             ("/nope", "/z", errno.ENOENT)]
    for old, new, code in cases:
        with pytest.raises(OSError) as e:
            u.rename(old, new)
        assert e.value.errno == code, (old, new)


def test_link_copies_up_and_shares_data(tree):
    write(tree["l1"] / "f", "one")
    u = make_union(tree)
    u.link("/f", "/g")
    fd = u.open("/g", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+two")
    os.close(fd)
    assert read(u, "/f") == "one+two"
    assert os.lstat(tree["upper"] / "f").st_nlink == 2


def test_private_xattrs_are_hidden(tree):
    (tree["l1"] / "d").mkdir()
    write(tree["l1"] / "d" / "x")
    u = make_union(tree)
    u.unlink("/d/x")
    u.rmdir("/d")
    u.mkdir("/d", 0o755)
    u.setxattr("/d", "user.visible", b"1", 0)
    assert u.listxattr("/d") == ["user.visible"]
    with pytest.raises(OSError) as e:
        u.setxattr("/d", "trusted.overlay.opaque", b"n", 0)
    assert e.value.errno == errno.EPERM


# -- inode numbers ------------------------------------------------------------------

def test_inode_numbers_survive_copy_up_rename_and_a_new_union(tree):
    """What a file shows as st_ino (and in listings) is fixed for life:
    copy-up, rename and a fresh Union over the same directories keep it."""
    write(tree["l1"] / "d" / "f", "f")
    write(tree["l0"] / "g", "g")
    u = make_union(tree)

    def ino(u, path):
        return u.lstat(path)[1]

    def listed(u, path):
        return {n: i for n, _, i in u.listdir(path)}

    before = {p: ino(u, p) for p in ("/d", "/d/f", "/g")}
    u.chmod("/g", 0o600)
    u.rename("/d", "/d2")
    got = {p: ino(u, p) for p in ("/d2", "/d2/f", "/g")}
    assert got == {"/d2": before["/d"], "/d2/f": before["/d/f"], "/g": before["/g"]}
    assert listed(u, "/d2")["f"] == before["/d/f"] and listed(u, "/")["g"] == before["/g"]
    again = make_union(tree)
    assert {p: ino(again, p) for p in got} == got


def test_lower_hard_links_stay_one_file_after_copy_up(tree):
    """Copying up one name of a lower hard link makes every merged name of
    it one upper file: one inode number, the right link count, a write
    through one seen through the others; a removed name counts down."""
    write(tree["l0"] / "h", "h")
    write(tree["l0"] / "d" / "keep")
    os.link(tree["l0"] / "h", tree["l0"] / "h2")
    os.link(tree["l0"] / "h", tree["l0"] / "d" / "h3")
    os.link(tree["l0"] / "h", tree["l0"] / "hidden")
    write(tree["l0"] / "other", "o")
    os.link(tree["l0"] / "other", tree["l0"] / "other2")
    u = make_union(tree)
    u.unlink("/hidden")                 # the other names count it down
    ino = u.lstat("/h")[1]
    fd = u.open("/h2", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+")
    os.close(fd)
    for p in ("/h", "/h2", "/d/h3"):
        st, i, _ = u.lstat(p)
        assert (i, st.st_nlink, read(u, p)) == (ino, 3, "h+"), p
    assert not os.path.lexists(tree["upper"] / "hidden")
    u.unlink("/other2")
    assert u.lstat("/other")[0].st_nlink == 1
    again = make_union(tree)
    assert [again.lstat(p)[0].st_nlink for p in ("/h", "/h2", "/d/h3")] == [3, 3, 3]
    assert again.lstat("/d/h3")[1] == ino


# -- uid/gid mapping ------------------------------------------------------------------

def test_id_mapping_both_ways():
    from unionfs.idmap import IdMap, parse_ranges
    m = IdMap(uids=parse_ranges("0:1000:10:1000:0:1"), gids=())
    assert [m.shown_uid(i) for i in (0, 9, 10, 1000, 5000)] == [1000, 1009, 65534, 0, 65534]
    assert [m.stored_uid(i) for i in (1000, 1009, 0, 7, -1)] == [0, 9, 1000, 65534, -1]
    assert m.shown_gid(5000) == 5000 and m.stored_gid(5000) == 5000   # no gid mapping
    squashed = IdMap(uids=parse_ranges("0:1000:10"), squash_root=True, squash_gid=7)
    assert (squashed.shown_uid(3), squashed.shown_gid(3)) == (0, 7)
    assert squashed.stored_uid(1003) == 3               # stored ids are still mapped
    # containers/storage's form (rootless podman): a leading colon
    assert parse_ranges(":0:100:5000") == ((0, 100, 5000),)
    assert parse_ranges(":0:1:1:1:200:10") == ((0, 1, 1), (1, 200, 10))
    for bad in ("", ":", "1:2", "a:b:c", "0:0:0", "-1:0:1"):
        with pytest.raises(ValueError):
            parse_ranges(bad)


# -- metadata-only copy-up (metacopy) ---------------------------------------------------

def _is_metacopy(real):
    from unionfs.metacopy import METACOPY_XATTRS
    return any(n in METACOPY_XATTRS for n in os.listxattr(real, follow_symlinks=False))


def test_metacopy_copies_metadata_only_until_the_data_changes(tree):
    data = os.urandom(3 << 20)
    (tree["l1"] / "d").mkdir()
    (tree["l1"] / "d" / "big").write_bytes(data)
    u = Union([str(tree["l0"]), str(tree["l1"])], str(tree["upper"]), str(tree["work"]),
              whiteout=wh.FORMAT_OCI, metacopy=True)
    ino = u.lstat("/d/big")[1]
    u.chmod("/d/big", 0o600)
    u.utimens("/d/big", 10**9, 2 * 10**9)
    u.setxattr("/d/big", "user.tag", b"t", 0)
    real = tree["upper"] / "d" / "big"
    st = os.lstat(real)
    assert _is_metacopy(real) and st.st_size == len(data) and st.st_blocks * 512 < 64 << 10
    assert read_bytes(u, "/d/big") == data
    # Moved, even with its directory, it still finds its data.
    u.rename("/d/big", "/d/moved")
    u.rename("/d", "/e")
    assert read_bytes(u, "/e/moved") == data
    assert (u.lstat("/e/moved")[1], stat.S_IMODE(u.lstat("/e/moved")[0].st_mode)) == (ino, 0o600)
    # The first open for writing copies the data, keeping what was changed.
    fd = u.open("/e/moved", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+")
    os.close(fd)
    real = tree["upper"] / "e" / "moved"
    assert not _is_metacopy(real) and real.read_bytes() == data + b"+"
    st, i, _ = u.lstat("/e/moved")
    assert i == ino and stat.S_IMODE(st.st_mode) == 0o600
    assert u.getxattr("/e/moved", "user.tag") == b"t"


def test_metacopy_truncate_link_and_off(tree):
    write(tree["l1"] / "t", "0123456789")
    write(tree["l1"] / "l", "linked")
    write(tree["l1"] / "full", "full")
    write(tree["l1"] / "m", "meta")
    u = Union([str(tree["l0"]), str(tree["l1"])], str(tree["upper"]), str(tree["work"]),
              whiteout=wh.FORMAT_OCI, metacopy=True)
    for p in ("/t", "/l", "/m"):
        u.chmod(p, 0o640)
    u.truncate("/t", 4)
    assert read(u, "/t") == "0123" and not _is_metacopy(tree["upper"] / "t")
    u.link("/l", "/l2")             # one upper file for two names: data first
    assert not _is_metacopy(tree["upper"] / "l") and read(u, "/l2") == "linked"
    off = make_union(tree)          # metacopy off: a full copy, as before
    off.chmod("/full", 0o600)
    assert (tree["upper"] / "full").read_text() == "full"
    assert not _is_metacopy(tree["upper"] / "full")
    # ... and it still reads what a metacopy union left.
    assert _is_metacopy(tree["upper"] / "m") and read(off, "/m") == "meta"


def read_bytes(u, path):
    fd = u.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read()
