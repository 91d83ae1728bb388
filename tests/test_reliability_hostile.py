"""Hostile names, sizes and layers: correct errors or correct results, the
daemon never dies, and nothing outside the layer directories is touched.

Names: 255 bytes work and 256 give ENAMETOOLONG; paths deeper than PATH_MAX;
names that are not UTF-8 round-trip byte for byte; ``.wh.`` names are
reserved (EINVAL) in every whiteout mode and markers never show.
Sizes: 64 KiB xattr values and many xattrs behave as on the upper's own
filesystem; sparse files stay sparse through copy-up.
Layers: symlinks to host paths (absolute, ``../..``), loops, symlinked
directory components, a symlinked work directory: a canary directory outside
the layers stays exactly as it was.
"""

import errno
import os
import stat
from pathlib import Path

import pytest

from conftest import IS_ROOT, UNIONFS, Layers, is_mounted, requires_fuse, run
from reliability_helpers import (alive, daemon_pid, mount_cli, quick_unmount, small_tmpfs,
                                 unmount_any, unmount_layers_after,  # noqa: F401
                                 work_leftovers, xattrs_of)
from unionfs.whiteout import is_private_xattr

pytestmark = [requires_fuse, pytest.mark.fuse]

MODES = ["overlay", "oci"]


def errno_of(fn, *a, **kw):
    """0 if ``fn`` succeeds, else its errno name."""
    try:
        fn(*a, **kw)
    except OSError as e:
        return errno.errorcode[e.errno]
    return 0


# -- names --------------------------------------------------------------------

@pytest.mark.parametrize("whiteout", MODES)
def test_long_names(layers, whiteout):
    lower = layers.lowers[0]
    n255, n256 = "n" * 255, "m" * 256
    (lower / n255).write_text("lower long\n")
    (lower / ("d" * 255)).mkdir()
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)
    assert (mnt / n255).read_text() == "lower long\n"
    (mnt / ("x" * 255)).write_text("upper long\n")
    os.mkdir(mnt / ("y" * 255))
    os.rename(mnt / ("x" * 255), mnt / ("z" * 255))
    assert (mnt / ("z" * 255)).read_text() == "upper long\n"
    os.symlink("t" * 255, mnt / ("s" * 255))
    assert os.readlink(mnt / ("s" * 255)) == "t" * 255
    for fn, args in [(os.stat, (mnt / n256,)), (os.mkdir, (mnt / n256,)),
                     (open, (mnt / n256, "w")), (os.rename, (mnt / n255, mnt / n256)),
                     (os.symlink, ("x", mnt / n256)), (os.link, (mnt / n255, mnt / n256))]:
        assert errno_of(fn, *args) == "ENAMETOOLONG", fn.__name__
    # Deleting a 255-byte lower name needs a whiteout of that name.
    got = errno_of(os.unlink, mnt / n255), errno_of(os.rmdir, mnt / ("d" * 255))
    if whiteout == "overlay":
        assert got == (0, 0)
        assert not os.path.lexists(mnt / n255)
    else:
        # ".wh." + 255 bytes cannot exist: the only correct answer is an
        # error, with the entry left as it was.
        assert got == ("ENAMETOOLONG", "ENAMETOOLONG")
        assert (mnt / n255).read_text() == "lower long\n"
        assert os.path.isdir(mnt / ("d" * 255))
    assert work_leftovers(layers) == []
    assert alive(pid)
    quick_unmount(mnt)


def _build_deep(mnt, comp, depth):
    """mkdir+chdir ``depth`` times below ``mnt``; returns how deep it got and
    the errno that stopped it (0 if none). Restores the cwd."""
    cwd = os.open(".", os.O_RDONLY)
    got, err = 0, 0
    try:
        os.chdir(mnt)
        for _ in range(depth):
            try:
                os.mkdir(comp)
                os.chdir(comp)
            except OSError as e:
                err = errno.errorcode[e.errno]
                break
            got += 1
        if not err:
            with open("leaf", "w") as f:
                f.write("deep\n")
            with open("leaf") as f:
                assert f.read() == "deep\n"
            os.rename("leaf", "leaf2")
            assert os.listdir(".") == ["leaf2"]
            os.unlink("leaf2")
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    return got, err


def _remove_deep(mnt, comp, depth):
    cwd = os.open(".", os.O_RDONLY)
    try:
        os.chdir(mnt)
        for _ in range(depth - 1):
            os.chdir(comp)
        for _ in range(depth):
            os.rmdir(comp)
            os.chdir("..")
    finally:
        os.fchdir(cwd)
        os.close(cwd)


PATH_MAX = os.pathconf("/", "PC_PATH_MAX")
DEEP = (2 * PATH_MAX) // 201 + 1           # merged paths twice PATH_MAX long


def test_paths_deeper_than_path_max_fail_cleanly(layers):
    """Whatever depth the daemon reaches, it fails with ENAMETOOLONG (never
    another error), everything built so far works and can be removed, and the
    daemon lives."""
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    comp = "p" * 200
    got, err = _build_deep(mnt, comp, DEEP)
    assert err in (0, "ENAMETOOLONG"), err
    if got:
        _remove_deep(mnt, comp, got)
    assert os.listdir(mnt) == []
    assert alive(pid)
    quick_unmount(mnt)


def test_paths_deeper_than_path_max_work(layers):
    mnt = mount_cli(layers)
    comp = "p" * 200
    try:
        got, err = _build_deep(mnt, comp, DEEP)
        assert (got, err) == (DEEP, 0), f"stopped at depth {got} of {DEEP} with {err}"
    finally:
        quick_unmount(mnt)


BAD_UTF8 = [b"caf\xe9", b"\xff\xfe-bom", b"half-\xc3", b"\xed\xa0\x80-surrogate", b"ok-\xe2\x82\xac"]


@pytest.mark.parametrize("whiteout", MODES)
def test_names_that_are_not_utf8_round_trip(layers, whiteout):
    lower = os.fsencode(layers.lowers[0])
    for n in BAD_UTF8:
        with open(os.path.join(lower, b"L" + n), "wb") as f:
            f.write(b"lower " + n)
        os.mkdir(os.path.join(lower, b"D" + n))
        with open(os.path.join(lower, b"D" + n, n), "wb") as f:
            f.write(n)
    mnt = os.fsencode(mount_cli(layers, f"whiteout={whiteout}"))
    pid = daemon_pid(os.fsdecode(mnt))
    for n in BAD_UTF8:
        p = os.path.join(mnt, b"U" + n)
        with open(p, "wb") as f:
            f.write(n)
        os.symlink(b"target-" + n, os.path.join(mnt, b"S" + n))
        os.setxattr(p, "user.v", n)
        os.rename(os.path.join(mnt, b"L" + n), os.path.join(mnt, b"R" + n))     # copy-up + whiteout
        os.rename(os.path.join(mnt, b"D" + n), os.path.join(mnt, b"E" + n))     # lower dir
        with open(os.path.join(mnt, b"E" + n, n), "ab") as f:
            f.write(b"+")
    want = sorted(p + n for n in BAD_UTF8 for p in (b"U", b"S", b"R", b"E"))
    assert sorted(os.listdir(mnt)) == want
    upper = os.fsencode(layers.upper)
    visible_upper = [x for x in os.listdir(upper) if not x.startswith(b".wh.")
                     and not stat.S_ISCHR(os.lstat(os.path.join(upper, x)).st_mode)]
    assert sorted(visible_upper) == want, "names changed on their way to the upper"
    for n in BAD_UTF8:
        with open(os.path.join(mnt, b"R" + n), "rb") as f:
            assert f.read() == b"lower " + n
        with open(os.path.join(mnt, b"E" + n, n), "rb") as f:
            assert f.read() == n + b"+"
        assert os.readlink(os.path.join(mnt, b"S" + n)) == b"target-" + n
        assert os.getxattr(os.path.join(mnt, b"U" + n), "user.v") == n
        assert os.listdir(os.path.join(mnt, b"E" + n)) == [n]
    quick_unmount(os.fsdecode(mnt))
    mnt = os.fsencode(mount_cli(layers, f"whiteout={whiteout}"))
    assert sorted(os.listdir(mnt)) == want          # whiteouts of such names hold
    assert alive(daemon_pid(os.fsdecode(mnt))) and not alive(pid)
    quick_unmount(os.fsdecode(mnt))


WH_NAMES = [".wh.x", ".wh.", ".wh..wh..opq", ".wh..wh.plnk"]


@pytest.mark.parametrize("whiteout", ["overlay", "oci", "auto"])
def test_whiteout_prefixed_names_are_reserved(layers, whiteout):
    lower = layers.lowers[0]
    (lower / "x").write_text("x\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "f").write_text("f\n")
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)
    for name in WH_NAMES:
        p = mnt / name
        for what, fn, args in [("create", open, (p, "w")), ("mkdir", os.mkdir, (p,)),
                               ("symlink", os.symlink, ("x", p)), ("mkfifo", os.mkfifo, (p,)),
                               ("link", os.link, (mnt / "x", p)),
                               ("rename", os.rename, (mnt / "x", p))]:
            assert errno_of(fn, *args) == "EINVAL", f"{what} {name}"
        assert errno_of(os.lstat, p) == "ENOENT"
    assert sorted(os.listdir(mnt)) == ["dir", "x"]
    assert alive(pid)
    quick_unmount(mnt)


def test_upper_markers_are_not_reachable_by_name(layers):
    lower = layers.lowers[0]
    (lower / "gone").write_text("deleted\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old\n")
    mnt = mount_cli(layers, "whiteout=oci")
    os.unlink(mnt / "gone")
    os.unlink(mnt / "dir" / "old")
    os.rmdir(mnt / "dir")
    os.mkdir(mnt / "dir")                       # opaque: .wh..wh..opq inside
    try:
        for p in (mnt / ".wh.gone", mnt / "dir" / ".wh..wh..opq"):
            assert errno_of(os.lstat, p) == "ENOENT", p
            assert errno_of(open, p) == "ENOENT", p
            assert errno_of(os.unlink, p) == "ENOENT", p
        assert sorted(os.listdir(mnt)) == ["dir"]
        assert os.listdir(mnt / "dir") == []
    finally:
        quick_unmount(mnt)


# -- sizes ----------------------------------------------------------------------

@pytest.fixture
def xattr_layers(tmp_path):
    """Layers on a tmpfs when root (it takes 64 KiB values and thousands of
    user xattrs; ext4 takes one block), else on tmp_path."""
    if not IS_ROOT:
        yield Layers(tmp_path / "l")
        return
    with small_tmpfs(tmp_path / "fs", "256m") as fs:
        layers = Layers(fs)
        try:
            yield layers
        finally:
            unmount_any(layers.mnt)


def test_huge_and_many_xattrs(xattr_layers, tmp_path):
    layers = xattr_layers
    lower = layers.lowers[0]
    # The upper's own filesystem decides what fits: learn it on a plain file.
    probe = layers.base / "probe"
    probe.write_text("")
    big = bytes(range(256)) * 256                                  # 64 KiB
    big_fits = errno_of(os.setxattr, probe, "user.big", big)
    many = 0
    while many < 2000 and not errno_of(os.setxattr, probe, f"user.k{many:04d}", b"v%d" % many):
        many += 1
    probe.unlink()
    if big_fits == 0:
        many = min(many, 1000)

    (lower / "f").write_text("data\n")
    if big_fits == 0:
        os.setxattr(lower / "f", "user.big", big)
    for i in range(many // 2):
        os.setxattr(lower / "f", f"user.k{i:04d}", b"v%d" % i)
    want = xattrs_of(lower / "f")
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    assert xattrs_of(mnt / "f") == want
    with open(mnt / "f", "a") as f:                 # copy-up keeps them all
        f.write("more\n")
    # (the union's own records, hidden from the merged view, aside)
    assert tuple(x for x in xattrs_of(layers.upper / "f") if not is_private_xattr(x[0])) == want
    assert xattrs_of(mnt / "f") == want
    for i in range(many // 2, many):                # and more through the mount
        os.setxattr(mnt / "f", f"user.k{i:04d}", b"v%d" % i)
    assert len(os.listxattr(mnt / "f")) == len(want) + many - many // 2
    (mnt / "g").write_text("")
    assert errno_of(os.setxattr, mnt / "g", "user.big", big) == big_fits
    if big_fits == 0:
        assert os.getxattr(mnt / "g", "user.big") == big
    # Kernel limits: values over 64 KiB, names over 255 bytes.
    assert errno_of(os.setxattr, mnt / "g", "user.huge", big + b"x") == "E2BIG"
    assert errno_of(os.setxattr, mnt / "g", "user." + "n" * 251, b"v") == "ERANGE"
    assert errno_of(os.getxattr, mnt / "g", "user.absent") == "ENODATA"
    assert errno_of(os.removexattr, mnt / "f", "user.absent") == "ENODATA"
    os.removexattr(mnt / "f", "user.k0000")
    assert "user.k0000" not in os.listxattr(mnt / "f")
    assert alive(pid)
    quick_unmount(mnt)
    print(f"\nxattrs: 64 KiB value {'fits' if big_fits == 0 else big_fits}, {many} xattrs on one file")


def test_sparse_file_stays_sparse_through_copy_up(layers):
    lower = layers.lowers[0]
    size = 1 << 30
    marks = [0, 123 << 20, size - 4096]
    with open(lower / "sparse", "wb") as f:
        for off in marks:
            f.seek(off)
            f.write(b"D" * 4096)
        f.truncate(size)
    if os.stat(lower / "sparse").st_blocks * 512 > 1 << 20:
        pytest.skip("the lower's filesystem does not keep holes")
    mnt = mount_cli(layers)
    with open(mnt / "sparse", "ab") as f:
        f.write(b"tail")
    st_upper = os.stat(layers.upper / "sparse")
    st_mnt = os.stat(mnt / "sparse")
    assert st_upper.st_size == st_mnt.st_size == size + 4
    assert st_upper.st_blocks * 512 < 1 << 20, f"copy-up filled the holes: {st_upper.st_blocks} blocks"
    assert st_mnt.st_blocks == st_upper.st_blocks
    with open(mnt / "sparse", "rb") as f:
        for off in marks:
            f.seek(off)
            assert f.read(4096) == b"D" * 4096
        f.seek(64 << 20)
        assert f.read(1 << 16) == bytes(1 << 16)
        f.seek(size)
        assert f.read() == b"tail"
    # A sparse file written through the mount is sparse in the upper too.
    with open(mnt / "new-sparse", "wb") as f:
        f.seek(size)
        f.write(b"end")
    assert os.stat(layers.upper / "new-sparse").st_blocks * 512 < 1 << 20
    quick_unmount(mnt)


# -- hostile layers -----------------------------------------------------------------

def canary_state(canary):
    """Everything about the canary tree, including times and owners."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(canary):
        for n in [""] + dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, canary)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                st.st_mtime_ns, st.st_ctime_ns, data,
                                                xattrs_of(p))
    return out


@pytest.fixture
def hostile(tmp_path):
    """Layers several levels deep (so ``../..`` from a layer and from the
    mount point lead to different places), and a canary directory next to
    the layers that ``../../canary`` from inside a layer reaches."""
    base = tmp_path / "x" / "y"
    layers = Layers(base)
    layers.mnt = base / "m" / "n" / "mnt"       # ../canary from here: nothing
    layers.mnt.mkdir(parents=True)
    canary = base / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret").write_text("secret\n")
    (canary / "sub" / "f").write_text("f\n")
    os.setxattr(canary / "secret", "user.c", b"1")
    layers.canary = canary
    try:
        yield layers
    finally:
        unmount_any(layers.mnt)


def _hostile_tree(layers):
    """Symlinks that lead out of the layers if a daemon followed them."""
    l0, l1 = layers.lowers
    c = str(layers.canary)
    for layer in (l0, layers.upper):
        tag = "L" if layer == l0 else "U"
        os.symlink(c + "/secret", layer / f"abs{tag}")
        os.symlink(c, layer / f"absdir{tag}")
        os.symlink("../canary/secret", layer / f"rel{tag}")     # from the layer: the canary
        os.symlink("../canary", layer / f"reldir{tag}")
        os.symlink(f"loop{tag}2", layer / f"loop{tag}1")
        os.symlink(f"loop{tag}1", layer / f"loop{tag}2")
        os.symlink(f"self{tag}", layer / f"self{tag}")
    # A directory in the top lower over a symlink to the canary below it, and
    # the other way round; a lower dir hidden by an upper symlink.
    (l0 / "mixed").mkdir()
    (l0 / "mixed" / "a").write_text("a\n")
    os.symlink(c, l1 / "mixed")
    os.symlink(c, l0 / "over")
    (l1 / "over").mkdir()
    (l1 / "over" / "secret").write_text("lower, not the canary\n")
    (l1 / "updir").mkdir()
    (l1 / "updir" / "x").write_text("x\n")
    os.symlink(c, layers.upper / "updir")
    # OCI markers that are symlinks to the canary, in the upper.
    (l1 / "hidden").write_text("hidden\n")
    os.symlink(c + "/secret", layers.upper / ".wh.hidden")


@pytest.mark.parametrize("whiteout", MODES)
def test_hostile_symlinks_never_lead_outside(hostile, whiteout):
    layers = hostile
    _hostile_tree(layers)
    before = canary_state(layers.canary)
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)

    # The merged view shows the links as links, with their targets verbatim.
    for tag in "LU":
        assert os.readlink(mnt / f"abs{tag}") == str(layers.canary / "secret")
        assert os.readlink(mnt / f"rel{tag}") == "../canary/secret"
        assert errno_of(open, mnt / f"loop{tag}1") == "ELOOP"
        assert errno_of(open, mnt / f"self{tag}") == "ELOOP"
        # Relative links resolve from the mount point, where no canary is.
        assert errno_of(open, mnt / f"rel{tag}") == "ENOENT"
        assert errno_of(open, mnt / f"rel{tag}", "w") == "ENOENT"
        assert errno_of(os.mkdir, mnt / f"reldir{tag}" / "new") == "ENOENT"
        assert errno_of(os.open, mnt / f"abs{tag}", os.O_RDONLY | os.O_NOFOLLOW) == "ELOOP"
        assert errno_of(os.open, mnt / f"absdir{tag}",
                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) in ("ELOOP", "ENOTDIR")
    assert sorted(os.listdir(mnt / "mixed")) == ["a"]
    assert errno_of(os.lstat, mnt / "mixed" / "secret") == "ENOENT"
    assert os.path.islink(mnt / "over") and os.path.islink(mnt / "updir")
    assert not os.path.lexists(mnt / "hidden")

    # Operations that act on the link itself (no following) and on names
    # below symlinked components of lower layers.
    for tag in "LU":
        os.utime(mnt / f"abs{tag}", (1, 1), follow_symlinks=False)
        os.utime(mnt / f"absdir{tag}", (2, 2), follow_symlinks=False)
        if IS_ROOT:
            os.lchown(mnt / f"abs{tag}", 5, 5)
            os.setxattr(mnt / f"absdir{tag}", "trusted.t", b"1", follow_symlinks=False)
        os.link(mnt / f"abs{tag}", mnt / f"hard{tag}", follow_symlinks=False)
        os.rename(mnt / f"rel{tag}", mnt / f"moved{tag}")
        os.rename(mnt / f"reldir{tag}", mnt / "mixed" / f"moveddir{tag}")
        os.unlink(mnt / f"absdir{tag}")
        os.unlink(mnt / f"loop{tag}1")
    (mnt / "mixed" / "new").write_text("new\n")
    os.unlink(mnt / "mixed" / "a")
    os.rename(mnt / "mixed", mnt / "mixed2")
    os.mkdir(mnt / "mixed")
    (mnt / "hidden").write_text("recreated\n")            # over a symlink marker
    os.unlink(mnt / "over")
    os.mkdir(mnt / "over")                                 # opaque over the lower dir
    assert os.listdir(mnt / "over") == []
    os.unlink(mnt / "updir")
    assert not os.path.lexists(mnt / "updir")
    os.mkdir(mnt / "updir")
    assert os.listdir(mnt / "updir") == []

    assert (mnt / "hidden").read_text() == "recreated\n"
    assert sorted(os.listdir(mnt / "mixed2")) == ["moveddirL", "moveddirU", "new"]
    assert os.readlink(mnt / "movedL") == os.readlink(mnt / "movedU") == "../canary/secret"
    assert os.readlink(mnt / "hardL") == str(layers.canary / "secret")
    assert alive(pid)
    quick_unmount(mnt)
    assert canary_state(layers.canary) == before, "the canary outside the layers changed"
    # The lower layers are untouched too.
    assert os.readlink(layers.lowers[0] / "absL") == str(layers.canary / "secret")
    assert (layers.lowers[1] / "over" / "secret").read_text() == "lower, not the canary\n"


def test_symlinked_work_directory_is_not_followed(hostile):
    layers = hostile
    (layers.lowers[0] / "f").write_text("f\n")
    os.symlink(layers.canary, layers.work / "unionfs-work")
    before = canary_state(layers.canary)
    r = run([UNIONFS, "mount", "-o", layers.options(), str(layers.mnt)])
    if r.returncode == 0:
        with open(layers.mnt / "f", "a") as f:
            f.write("more\n")
        assert (layers.mnt / "f").read_text() == "f\nmore\n"
        quick_unmount(layers.mnt)
    else:                            # refusing to mount is a correct answer too
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "unionfs-work" in lines[0], r.stderr
        assert not is_mounted(layers.mnt)
    assert canary_state(layers.canary) == before, f"the canary changed (mount: {r.stderr.strip()})"
