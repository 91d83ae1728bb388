"""Kernel-level guarantees, side by side with kernel overlayfs.

Each scenario runs once on unionfs (through the CLI) and once on kernel
overlayfs mounted ``index=on,xino=on,metacopy=on,redirect_dir=on``, each over
its own copy of the same three lower layers (the middle one on a tmpfs, so
the layers span two filesystems), and asserts what a program sees: inode
numbers that never change and never collide, listings whose d_ino agrees
with stat, and the same after unmount and remount.
"""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import pytest

from conftest import IS_ROOT, UNIONFS, force_unmount, is_mounted, requires_fuse, run
from reliability_helpers import kernel_overlay_available, small_tmpfs, unmount_any

pytestmark = [requires_fuse, pytest.mark.fuse]

KERNEL_OPTIONS = "index=on,xino=on,metacopy=on,redirect_dir=on"
SYSTEMS = [
    "unionfs",
    pytest.param("kernel", marks=pytest.mark.skipif(
        not kernel_overlay_available(), reason="kernel overlayfs not available (needs root)")),
]


class Stack:
    """Three lowers (``l1`` on another filesystem when root), upper, work, mnt."""

    def __init__(self, base, other_fs):
        self.base = base
        self.lowers = [base / "l0", other_fs / "l1", base / "l2"]
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        for d in self.lowers + [self.upper, self.work, self.mnt]:
            d.mkdir(parents=True)

    def options(self, extra=""):
        o = (f"lowerdir={':'.join(map(str, self.lowers))},"
             f"upperdir={self.upper},workdir={self.work}")
        return o + ("," + extra if extra else "")


class System:
    """Mounts ``stack`` with unionfs or kernel overlayfs, again and again."""

    def __init__(self, name, stack, extra=""):
        self.name, self.stack, self.extra = name, stack, extra

    def mount(self):
        if self.name == "kernel":
            cmd = ["mount", "-t", "overlay", "overlay", "-o",
                   self.stack.options(KERNEL_OPTIONS), str(self.stack.mnt)]
        else:
            cmd = [UNIONFS, "mount", "-o", self.stack.options(self.extra), str(self.stack.mnt)]
        r = run(cmd, timeout=30)
        assert r.returncode == 0, f"{self.name} mount failed: {r.stderr.strip()}"
        return self.stack.mnt

    def umount(self):
        cmd = ["umount"] if self.name == "kernel" else [UNIONFS, "umount"]
        r = run(cmd + [str(self.stack.mnt)], timeout=30)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(self.stack.mnt)

    def remount(self):
        self.umount()
        return self.mount()


@contextlib.contextmanager
def stack_on(tmp_path):
    """A Stack whose middle lower is on a tmpfs (root) or beside the others."""
    other = tmp_path / "other"
    with (small_tmpfs(other, "16m") if IS_ROOT else contextlib.nullcontext(other)):
        st = Stack(tmp_path / "s", other)
        try:
            yield st
        finally:
            unmount_any(st.mnt)
            force_unmount(st.mnt)


def write(path, data="x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


def all_entries(mnt):
    """Every merged path below ``mnt`` (relative), directories included."""
    out = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), mnt))
    return sorted(out)


def inos(mnt):
    return {p: os.lstat(mnt / p).st_ino for p in all_entries(mnt)}


def assert_listings_match_stat(mnt):
    """readdir's d_ino is the st_ino of the same entry, in every directory
    (a listing read twice: the second may come from the kernel's cache)."""
    for dirpath, _, _ in os.walk(mnt):
        for _ in range(2):
            with os.scandir(dirpath) as it:
                for e in it:
                    assert e.inode() == os.lstat(e.path).st_ino, e.path


# -- stable, unique inode numbers --------------------------------------------------

@pytest.mark.parametrize("system", SYSTEMS)
def test_inode_numbers_survive_copy_up_rename_and_remount(tmp_path, system):
    with stack_on(tmp_path) as st:
        l0, l1, l2 = st.lowers
        write(l2 / "a")
        write(l1 / "b")
        write(l0 / "c")
        write(l2 / "d" / "x")
        write(l1 / "d" / "y")
        write(l2 / "d" / "sub" / "z")
        write(l1 / "e")
        (l2 / "link").symlink_to("a")
        s = System(system, st)
        mnt = s.mount()
        before = inos(mnt)
        assert len(set(before.values())) == len(before), f"inode numbers collide: {before}"
        assert_listings_match_stat(mnt)

        os.chmod(mnt / "a", 0o600)                       # copy-up by chmod
        with open(mnt / "b", "a") as f:                  # ... by an open for writing
            f.write("more\n")
        os.utime(mnt / "e", ns=(10**9, 10**9))           # ... by utimes
        os.rename(mnt / "c", mnt / "c2")                 # a lower file renamed
        os.rename(mnt / "d", mnt / "d2")                 # a merged directory renamed
        if IS_ROOT:     # (a user.* record cannot go on a symlink)
            os.chown(mnt / "link", 0, 0, follow_symlinks=False)
        write(mnt / "new")
        mkd = mnt / "newdir"
        mkd.mkdir()
        moved = {"c": "c2", "d": "d2", "d/x": "d2/x", "d/y": "d2/y", "d/sub": "d2/sub",
                 "d/sub/z": "d2/sub/z"}
        want = {moved.get(p, p): ino for p, ino in before.items()}
        after = inos(mnt)
        assert {p: after[p] for p in want} == want
        assert len(set(after.values())) == len(after), f"inode numbers collide: {after}"
        assert_listings_match_stat(mnt)

        mnt = s.remount()
        assert inos(mnt) == after
        assert_listings_match_stat(mnt)
        # A second round of changes after the remount keeps them too.
        os.rename(mnt / "a", mnt / "newdir" / "a")
        os.rename(mnt / "d2", mnt / "newdir" / "d3")
        again = inos(mnt)
        assert again["newdir/a"] == before["a"]
        assert again["newdir/d3/sub/z"] == before["d/sub/z"]
        assert_listings_match_stat(mnt)
        s.umount()


def test_the_upper_with_inode_records_stays_mountable_by_kernel_overlayfs(tmp_path):
    if not kernel_overlay_available():
        pytest.skip("kernel overlayfs not available (needs root)")
    with stack_on(tmp_path) as st:
        write(st.lowers[2] / "d" / "f", "lower\n")
        write(st.lowers[1] / "g", "g\n")
        s = System("unionfs", st, "whiteout=overlay")
        mnt = s.mount()
        (mnt / "d" / "f").write_text("changed\n")
        os.chmod(mnt / "g", 0o600)
        os.rename(mnt / "d", mnt / "d2")
        s.umount()
        shutil.rmtree(st.work)
        st.work.mkdir()
        k = System("kernel", st)
        kmnt = k.mount()
        assert (kmnt / "d2" / "f").read_text() == "changed\n"
        assert os.stat(kmnt / "g").st_mode & 0o777 == 0o600
        assert not (kmnt / "d").exists()
        assert not any("unionfs" in n for n in os.listxattr(kmnt / "g"))
        k.umount()


# -- uid/gid mapping (fuse-overlayfs's options) ------------------------------------

MAPPINGS = [
    "uidmapping=0:1000:10:1000:0:1,gidmapping=0:1000:10:1000:0:1",
    "uidmapping=0:100000:65536",                      # gids pass unchanged
    "squash_to_uid=42,squash_to_gid=43",
    "squash_to_root",
    "uidmapping=0:1000:10,gidmapping=0:2000:10,squash_to_root,squash_to_gid=7",
]
OWNERS = {"a": (0, 0), "b": (1000, 1000), "c": (5000, 5000), "d": (3, 4)}


def id_story(mnt, upper):
    """What a program sees and what lands in the upper: the owners shown,
    then chown to a mapped id, to an unmapped one, and a file created by
    root through the mount, each as (shown, stored)."""
    seen = {n: (os.lstat(mnt / n).st_uid, os.lstat(mnt / n).st_gid) for n in [".", *OWNERS]}

    def both(n):
        s, u = os.lstat(mnt / n), os.lstat(upper / n)
        return (s.st_uid, s.st_gid), (u.st_uid, u.st_gid)

    os.chown(mnt / "a", 1003, 1003)
    os.chown(mnt / "b", 7777, 7777)
    os.chown(mnt / "c", 100005, -1)
    (mnt / "new").write_text("n")
    (mnt / "newdir").mkdir()
    return seen, {n: both(n) for n in ("a", "b", "c", "new", "newdir")}


def mount_with(program, st, opts):
    options = st.options(opts)
    if program == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", options, str(st.mnt)]
    elif program == "fuse-unionfs":
        cmd = [str(Path(UNIONFS).parent / "fuse-unionfs"), "-o", options, str(st.mnt)]
    else:
        cmd = [UNIONFS, "mount", "-o", options, str(st.mnt)]
    r = run(cmd, timeout=30)
    assert r.returncode == 0, f"{program}: {r.stderr.strip()}"


@pytest.mark.skipif(not IS_ROOT, reason="storing other owners needs root")
@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs not installed")
@pytest.mark.parametrize("opts", MAPPINGS)
def test_id_mapping_as_fuse_overlayfs(tmp_path, opts):
    stories = {}
    for program in ("fuse-overlayfs", "unionfs", "fuse-unionfs"):
        st = Stack(tmp_path / program, tmp_path / program / "o")
        for n, (uid, gid) in OWNERS.items():
            write(st.lowers[2] / n, n)
            os.chown(st.lowers[2] / n, uid, gid)
        try:
            mount_with(program, st, opts)
            stories[program] = id_story(st.mnt, st.upper)
        finally:
            unmount_any(st.mnt)
    assert stories["unionfs"] == stories["fuse-overlayfs"], stories
    assert stories["fuse-unionfs"] == stories["fuse-overlayfs"]


def test_id_mapping_shown_and_stored(tmp_path):
    """The mapping itself, independent of any reference: stored 0 shows as
    1000, shown 1003 is stored as 3, anything outside shows as 65534."""
    if not IS_ROOT:
        pytest.skip("storing other owners needs root")
    st = Stack(tmp_path / "s", tmp_path / "o")
    write(st.lowers[2] / "root-owned")
    write(st.lowers[2] / "far")
    os.chown(st.lowers[2] / "far", 50000, 50000)
    try:
        mount_with("unionfs", st, "uidmapping=0:1000:10,gidmapping=0:1000:10")
        m = st.mnt
        assert (os.lstat(m / "root-owned").st_uid, os.lstat(m / "root-owned").st_gid) == (1000, 1000)
        assert os.lstat(m / "far").st_uid == 65534
        os.chown(m / "root-owned", 1003, 1004)
        u = os.lstat(st.upper / "root-owned")
        assert (u.st_uid, u.st_gid) == (3, 4)
        assert (os.lstat(m / "root-owned").st_uid, os.lstat(m / "root-owned").st_gid) == (1003, 1004)
    finally:
        unmount_any(st.mnt)


@pytest.mark.parametrize("opts, why", [
    ("uidmapping=0:1000", "ID:HOST:LEN"),
    ("gidmapping=a:b:c", "numbers"),
    ("uidmapping=0:1000:0", "LEN"),
    ("squash_to_uid=-1", "not a uid"),
    ("metacopy=yes", "on or off"),
])
def test_bad_options_are_one_line(tmp_path, opts, why):
    st = Stack(tmp_path / "s", tmp_path / "o")
    r = run([UNIONFS, "mount", "-o", st.options(opts), str(st.mnt)], timeout=30)
    assert r.returncode != 0 and not is_mounted(st.mnt)
    assert len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr


# -- lower hard links across copy-up -------------------------------------------------

def links_view(mnt, names):
    return {n: (os.lstat(mnt / n).st_ino, os.lstat(mnt / n).st_nlink, (mnt / n).read_text())
            for n in names}


@pytest.mark.parametrize("system", SYSTEMS)
def test_lower_hard_links_survive_copy_up_and_remount(tmp_path, system):
    with stack_on(tmp_path) as st:
        low = st.lowers[2]
        write(low / "h", "h\n")
        write(low / "d" / "x")
        os.link(low / "h", low / "h2")
        os.link(low / "h", low / "d" / "h3")
        write(low / "o", "o\n")
        os.link(low / "o", low / "o2")
        s = System(system, st)
        mnt = s.mount()
        names = ["h", "h2", "d/h3"]
        before = links_view(mnt, names)         # the kernel knows every name now
        ino = before["h"][0]
        assert before == {n: (ino, 3, "h\n") for n in names}

        with open(mnt / "h", "a") as f:         # copy-up through one name
            f.write("more\n")
        assert links_view(mnt, names) == {n: (ino, 3, "h\nmore\n") for n in names}
        with open(mnt / "d" / "h3", "a") as f:  # a write through another
            f.write("third\n")
        assert (mnt / "h2").read_text() == "h\nmore\nthird\n"
        os.link(mnt / "h2", mnt / "h4")
        names.append("h4")
        want = {n: (ino, 4, "h\nmore\nthird\n") for n in names}
        assert links_view(mnt, names) == want

        o_ino = os.lstat(mnt / "o").st_ino
        os.unlink(mnt / "o2")                    # one name of an untouched link
        assert (os.lstat(mnt / "o").st_ino, os.lstat(mnt / "o").st_nlink) == (o_ino, 1)
        assert_listings_match_stat(mnt)

        mnt = s.remount()
        assert links_view(mnt, names) == want
        assert (os.lstat(mnt / "o").st_ino, os.lstat(mnt / "o").st_nlink) == (o_ino, 1)
        assert_listings_match_stat(mnt)
        s.umount()


def _lock_conflicts(a, b):
    """True if an exclusive flock on ``b`` is refused while another open
    file holds one on ``a``: the kernel keeps flocks per inode, so two names
    conflict only when the kernel has them as one inode."""
    with open(a) as fa, open(b) as fb:
        fcntl.flock(fa, fcntl.LOCK_EX)
        try:
            fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fb, fcntl.LOCK_UN)
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("system", SYSTEMS)
def test_names_known_before_a_hard_link_copy_up_join_one_inode(tmp_path, system):
    """Names of a lower hard link the kernel looked up before one of them
    was copied up end up as one kernel inode with it (as overlayfs's one
    inode per file): an flock through one name excludes one through another.
    Also when the copy-up comes from a link() or rename() in the directory
    of another name (the kernel holds that directory's lock meanwhile)."""
    if system == "unionfs" and os.environ.get("UNIONFS_LIBFUSE"):
        pytest.skip("the libfuse bindings cannot tell the kernel to forget a name: "
                    "the names stay aliases (README, hard links)")
    with stack_on(tmp_path) as st:
        low = st.lowers[2]
        write(low / "d" / "x")
        for n in ("h", "k", "m"):
            write(low / n, n + "\n")
            os.link(low / n, low / (n + "2"))
        os.link(low / "h", low / "d" / "h3")
        s = System(system, st)
        mnt = s.mount()
        links_view(mnt, ["h", "h2", "d/h3", "k", "k2", "m", "m2"])  # the kernel knows them
        early = open(mnt / "h2")                # open before the copy-up
        with open(mnt / "h", "a") as f:         # copy-up through one name
            f.write("more\n")
        assert _lock_conflicts(mnt / "h", mnt / "h2")
        assert _lock_conflicts(mnt / "d" / "h3", mnt / "h")
        assert (mnt / "h2").read_text() == "h\nmore\n"
        assert os.fstat(early.fileno()).st_ino == os.lstat(mnt / "h").st_ino
        early.close()
        os.link(mnt / "k", mnt / "k3")          # copy-up by link(), k2 beside it
        assert _lock_conflicts(mnt / "k2", mnt / "k3")
        assert os.lstat(mnt / "k2").st_nlink == 3
        os.rename(mnt / "m", mnt / "m3")        # copy-up by rename(), m2 beside it
        assert _lock_conflicts(mnt / "m2", mnt / "m3")
        assert (mnt / "m2").read_text() == "m\n"
        s.umount()


# -- metadata-only copy-up -------------------------------------------------------------

MiB = 1 << 20


def disk_usage(root):
    """Bytes allocated below ``root`` (what du counts)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def contents(root):
    """relative path -> (bytes, uid, mode) of every file below ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (Path(p).read_bytes(), st.st_uid, st.st_mode & 0o7777)
    return out


def build_image_tree(low, size=64 * MiB):
    """``size`` bytes in 1 MiB files over a few directories, plus small ones."""
    block = os.urandom(MiB)
    for i in range(size // MiB):
        d = low / f"usr{i % 4}" / f"lib{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(block[i:] + block[:i])
    for i in range(50):
        write(low / "etc" / f"conf{i}", f"conf {i}\n")


@pytest.mark.skipif(not IS_ROOT, reason="chown -R to another owner needs root")
@pytest.mark.parametrize("system", SYSTEMS)
def test_chown_and_chmod_of_a_64_mib_tree_copy_metadata_only(tmp_path, system):
    with stack_on(tmp_path) as st:
        build_image_tree(st.lowers[2])
        want = {p: data for p, (data, _, _) in contents(st.lowers[2]).items()}
        s = System(system, st, "metacopy=on")
        mnt = s.mount()
        for cmd in (["chown", "-R", "1234:1234", str(mnt)], ["chmod", "-R", "g+w", str(mnt)]):
            r = run(cmd, timeout=300)
            assert r.returncode == 0, r.stderr
        assert disk_usage(st.upper) < 4 * MiB
        seen = contents(mnt)
        assert {p: d for p, (d, _, _) in seen.items()} == want
        assert all(uid == 1234 and mode & 0o020 for _, uid, mode in seen.values())

        # The first write copies that file's data, and only that file's.
        before = disk_usage(st.upper)
        f = mnt / "usr1" / "lib1" / "f1"
        with open(f, "r+b") as fh:
            fh.seek(10)
            fh.write(b"CHANGED")
        data = want["usr1/lib1/f1"]
        want["usr1/lib1/f1"] = data[:10] + b"CHANGED" + data[17:]
        assert f.read_bytes() == want["usr1/lib1/f1"]
        assert disk_usage(st.upper) >= before + MiB - 64 * 1024
        assert disk_usage(st.upper) < before + 2 * MiB
        mnt = s.remount()
        assert {p: d for p, (d, _, _) in contents(mnt).items()} == want
        assert os.lstat(mnt / "usr1" / "lib1" / "f1").st_uid == 1234
        s.umount()


@pytest.mark.skipif(not kernel_overlay_available(), reason="kernel overlayfs not available")
def test_kernel_overlayfs_with_metacopy_reads_our_metacopy_upper(tmp_path):
    with stack_on(tmp_path) as st:
        build_image_tree(st.lowers[2], 8 * MiB)
        s = System("unionfs", st, "metacopy=on,whiteout=overlay")
        mnt = s.mount()
        run(["chown", "-R", "42:43", str(mnt / "usr0")], check=True)
        os.chmod(mnt / "usr1" / "lib1" / "f1", 0o600)
        os.rename(mnt / "usr1" / "lib1" / "f1", mnt / "etc" / "moved")   # a metacopy moved
        os.rename(mnt / "usr2", mnt / "usr9")                            # a lower tree moved
        with open(mnt / "usr3" / "lib0" / "f3", "ab") as f:              # a completed copy
            f.write(b"tail")
        ours = contents(mnt)
        s.umount()
        assert disk_usage(st.upper) < 2 * MiB
        shutil.rmtree(st.work)
        st.work.mkdir()
        k = System("kernel", st)
        kmnt = k.mount()
        assert contents(kmnt) == ours
        assert_listings_match_stat(kmnt)        # metacopy dirs are marked impure
        k.umount()
