"""Integration tests: real mounts through /dev/fuse with the real CLI."""

import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import (FUSE_UNIONFS, UNIONFS, force_unmount, is_mounted, kernel_overlay_refusal,
                      requires_fuse, requires_root, run, wait_for)
from elf_helpers import EXIT_IF_NOBODY, EXIT_IF_ROOT, euid_program
from reliability_helpers import daemon_pid

pytestmark = requires_fuse


def tree_of(root):
    """{relative path: (type, content or target)} of a directory tree."""
    out = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", p.read_bytes())
            else:
                out[rel] = ("o", stat.S_IFMT(st.st_mode))
    return out


def populate(layers):
    l0, l1 = layers.lowers
    (l1 / "etc").mkdir()
    (l1 / "etc" / "passwd").write_text("root:x:0:0\n")
    (l1 / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (l1 / "var" / "cache").mkdir(parents=True)
    (l1 / "var" / "cache" / "old").write_text("stale")
    (l0 / "etc").mkdir()
    (l0 / "etc" / "hosts").write_text("10.0.0.1 top\n")
    (l0 / "bin").mkdir()
    os.symlink("busybox", l0 / "bin" / "sh")


def test_merged_view_copy_up_whiteout_opaque(layers, mounted):
    populate(layers)
    before = tree_of(layers.base / "l1"), tree_of(layers.base / "l0")
    mnt = mounted()
    assert sorted(os.listdir(mnt)) == ["bin", "etc", "var"]
    assert sorted(os.listdir(mnt / "etc")) == ["hosts", "passwd"]
    assert (mnt / "etc" / "hosts").read_text() == "10.0.0.1 top\n"
    assert os.readlink(mnt / "bin" / "sh") == "busybox"

    with open(mnt / "etc" / "passwd", "a") as f:             # copy-up
        f.write("user:x:1000:1000\n")
    assert (mnt / "etc" / "passwd").read_text() == "root:x:0:0\nuser:x:1000:1000\n"
    (mnt / "etc" / "hosts").unlink()                         # whiteout
    assert sorted(os.listdir(mnt / "etc")) == ["passwd"]
    (mnt / "var" / "cache" / "old").unlink()
    (mnt / "var" / "cache").rmdir()
    (mnt / "var" / "cache").mkdir()                          # opaque
    assert os.listdir(mnt / "var" / "cache") == []
    assert (tree_of(layers.base / "l1"), tree_of(layers.base / "l0")) == before

    view = tree_of(mnt)
    run([UNIONFS, "umount", str(mnt)], check=True)
    assert not is_mounted(mnt)
    r = run([UNIONFS, "mount", "-o", layers.options(), str(mnt)])
    assert r.returncode == 0, r.stderr
    try:
        assert tree_of(mnt) == view                          # survives a remount
    finally:
        force_unmount(mnt)


def test_read_only_without_upper(layers, mounted):
    populate(layers)
    mnt = mounted(upper=False)
    assert (mnt / "etc" / "passwd").read_text() == "root:x:0:0\n"
    for action in (lambda: open(mnt / "etc" / "passwd", "a"),
                   lambda: (mnt / "new").write_text("x"),
                   lambda: (mnt / "etc" / "hosts").unlink(),
                   lambda: (mnt / "d").mkdir()):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS


def test_hard_links_share_data(layers, mounted):
    populate(layers)
    mnt = mounted()
    os.link(mnt / "etc" / "passwd", mnt / "etc" / "passwd2")
    with open(mnt / "etc" / "passwd2", "a") as f:
        f.write("via link\n")
    assert (mnt / "etc" / "passwd").read_text().endswith("via link\n")
    a, b = os.stat(mnt / "etc" / "passwd"), os.stat(mnt / "etc" / "passwd2")
    assert a.st_ino == b.st_ino


def test_rename_directory_from_lower(layers, mounted):
    populate(layers)
    mnt = mounted()
    os.rename(mnt / "etc", mnt / "config")
    assert sorted(os.listdir(mnt)) == ["bin", "config", "var"]
    assert sorted(os.listdir(mnt / "config")) == ["hosts", "passwd"]
    assert (mnt / "config" / "hosts").read_text() == "10.0.0.1 top\n"
    os.rename(mnt / "config" / "hosts", mnt / "config" / "passwd")
    assert (mnt / "config" / "passwd").read_text() == "10.0.0.1 top\n"


def test_special_files_xattrs_statfs(layers, mounted):
    populate(layers)
    mnt = mounted()
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    os.symlink("/nowhere", mnt / "dangling")
    assert os.readlink(mnt / "dangling") == "/nowhere"
    os.setxattr(mnt / "etc" / "passwd", "user.tag", b"v1")
    assert os.getxattr(mnt / "etc" / "passwd", "user.tag") == b"v1"
    assert "user.tag" in os.listxattr(mnt / "etc" / "passwd")
    os.removexattr(mnt / "etc" / "passwd", "user.tag")
    assert "user.tag" not in os.listxattr(mnt / "etc" / "passwd")
    sv = os.statvfs(mnt)
    assert sv.f_blocks > 0 and sv.f_bsize > 0


def test_times_and_mtime_only_update(layers, mounted):
    populate(layers)
    mnt = mounted()
    p = mnt / "etc" / "passwd"
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(p)
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    # touch -m: mtime only, atime UTIME_OMIT (dropped by libfuse2 by default).
    r = run(["touch", "-m", "-d", "2001-02-03 04:05:06 UTC", str(p)])
    assert r.returncode == 0, r.stderr
    assert int(os.stat(p).st_mtime) == 981173106
    assert os.stat(p).st_atime_ns == 1_500_000_000_123_456_789


def test_unlinked_open_file_keeps_working(layers, mounted):
    populate(layers)
    mnt = mounted()
    with open(mnt / "scratch", "w+") as f:
        f.write("abc")
        os.unlink(mnt / "scratch")
        f.write("def")
        f.seek(0)
        assert f.read() == "abcdef"
        assert os.fstat(f.fileno()).st_size == 6
    assert os.listdir(layers.upper) == []                 # no .fuse_hidden files


def test_names_that_are_not_utf8_round_trip(layers, mounted):
    mnt = mounted()
    name = b"caf\xe9-\xff\xfe"
    path = os.path.join(os.fsencode(mnt), name)
    with open(path, "wb") as f:
        f.write(b"latin-1 name")
    assert name in os.listdir(os.fsencode(mnt))
    assert os.path.exists(os.path.join(os.fsencode(layers.upper), name))
    with open(path, "rb") as f:
        assert f.read() == b"latin-1 name"


def test_concurrent_appends_to_one_lower_file(layers, mounted):
    (layers.lowers[1] / "log").write_text("start\n")
    mnt = mounted()
    writers, lines = 8, 200
    script = ("import sys\n"
              "p, w, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
              "for i in range(n):\n"
              "    with open(p, 'a') as f: f.write(f'{w}:{i}\\n')\n")
    procs = [subprocess.Popen(["python3", "-c", script, str(mnt / "log"), str(w), str(lines)])
             for w in range(writers)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    got = (mnt / "log").read_text().splitlines()
    assert got[0] == "start"
    assert sorted(got[1:]) == sorted(f"{w}:{i}" for w in range(writers) for i in range(lines))
    assert (layers.lowers[1] / "log").read_text() == "start\n"
    assert os.listdir(layers.work / "unionfs-work") == []


@pytest.fixture
def shared_layers(mounter):
    """Layers under a directory every user may traverse (tmp_path is 0700)."""
    from conftest import Layers
    base = tempfile.mkdtemp(prefix="unionfs-shared-")
    os.chmod(base, 0o755)
    try:
        yield Layers(base)
    finally:
        mounter.cleanup()
        subprocess.run(["rm", "-rf", base], timeout=60)


@requires_root
def test_files_belong_to_the_caller_and_modes_are_enforced(shared_layers, mounter):
    layers = shared_layers
    populate(layers)
    mnt = mounter.mount(layers)
    os.chmod(mnt, 0o1777)
    nobody = 65534

    def as_nobody(code):
        return subprocess.run(["python3", "-c", code], capture_output=True, text=True,
                              timeout=60, preexec_fn=lambda: (os.setgid(nobody), os.setuid(nobody)))

    r = as_nobody(f"open({str(mnt / 'mine')!r}, 'w').write('x')")
    assert r.returncode == 0, r.stderr
    st = os.stat(mnt / "mine")
    assert (st.st_uid, st.st_gid) == (nobody, nobody)
    assert os.stat(layers.upper / "mine").st_uid == nobody
    r = as_nobody(f"open({str(mnt / 'etc' / 'passwd')!r}, 'a').write('evil')")
    assert "PermissionError" in r.stderr
    assert (mnt / "etc" / "passwd").read_text() == "root:x:0:0\n"
    # The sticky bit on / protects root's file from nobody.
    (mnt / "rootfile").write_text("r")
    r = as_nobody(f"import os; os.unlink({str(mnt / 'rootfile')!r})")
    assert "PermissionError" in r.stderr
    assert (mnt / "rootfile").exists()


def as_nobody(argv):
    nobody = 65534
    return subprocess.run(argv, capture_output=True, timeout=60,
                          preexec_fn=lambda: (os.setgroups([]), os.setgid(nobody), os.setuid(nobody)))


@requires_root
@pytest.mark.parametrize("extra, status", [("", EXIT_IF_ROOT), ("nosuid", EXIT_IF_NOBODY)])
def test_set_uid_files_take_effect_as_on_a_rootfs(shared_layers, mounter, extra, status):
    """Mounted by root, a set-uid root program run by another user gets euid
    0 (as on kernel overlayfs): su, sudo and passwd work in the rootfs;
    `-o nosuid` turns that off."""
    program = euid_program()
    if program is None:
        pytest.skip("no euid test program written for this architecture")
    layers = shared_layers
    (layers.lowers[1] / "bin").mkdir()
    (layers.lowers[1] / "bin" / "euid").write_bytes(program)
    os.chmod(layers.lowers[1] / "bin" / "euid", 0o4755)
    mnt = mounter.mount(layers, extra=extra)
    assert as_nobody([str(mnt / "bin" / "euid")]).returncode == status


@requires_root
@pytest.mark.parametrize("extra", ["", "nodev"])
def test_device_nodes_open_as_on_a_rootfs(layers, mounter, extra):
    """A rootfs's own /dev/null (char 1,3) opens and takes writes when root
    mounted it (dpkg's maintainer scripts write to it); `-o nodev` refuses."""
    (layers.lowers[1] / "dev").mkdir()
    os.mknod(layers.lowers[1] / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    mnt = mounter.mount(layers, extra=extra)
    if extra == "nodev":
        with pytest.raises(PermissionError):
            open(mnt / "dev" / "null", "w")
        return
    with open(mnt / "dev" / "null", "w") as f:
        f.write("discarded\n")
    assert (mnt / "dev" / "null").read_text() == ""
    st = os.stat(mnt / "dev" / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


@requires_root
def test_kernel_overlayfs_reads_our_upper(layers, mounted, tmp_path):
    populate(layers)
    mnt = mounted(extra="whiteout=overlay")
    (mnt / "etc" / "hosts").unlink()
    (mnt / "var" / "cache" / "old").unlink()
    (mnt / "var" / "cache").rmdir()
    (mnt / "var" / "cache").mkdir()
    (mnt / "var" / "cache" / "fresh").write_text("new")
    with open(mnt / "etc" / "passwd", "a") as f:
        f.write("more\n")
    os.rename(mnt / "bin", mnt / "sbin")
    ours = tree_of(mnt)
    run([UNIONFS, "umount", str(mnt)], check=True)
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    why = kernel_overlay_refusal(tmp_path / "probe")
    if why:
        pytest.skip(f"kernel overlayfs unavailable: {why}")
    lower = ":".join(map(str, layers.lowers))
    r = run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={layers.upper},workdir={kwork}", str(kmnt)])
    assert r.returncode == 0, f"kernel overlayfs refuses the upper unionfs wrote: {r.stderr}"
    try:
        assert tree_of(kmnt) == ours
    finally:
        run(["umount", str(kmnt)])


def test_sigterm_unmounts_cleanly(layers):
    populate(layers)
    p = subprocess.Popen([UNIONFS, "mount", "-f", "-o", layers.options(), str(layers.mnt)],
                         stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: is_mounted(layers.mnt)), "mount did not appear"
        assert wait_for(lambda: os.path.exists(layers.mnt / "etc"))
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not is_mounted(layers.mnt)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(layers.mnt)


def test_fuse_unionfs_takes_fuse_overlayfs_argv(layers):
    populate(layers)
    opts = f"lowerdir={':'.join(map(str, layers.lowers))},,upperdir={layers.upper}," \
           f"workdir={layers.work},rw,dev,suid,volatile,redirect_dir=on,"
    r = run([FUSE_UNIONFS, "overlay-source", str(layers.mnt), "-o", opts])
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(layers.mnt)
        assert sorted(os.listdir(layers.mnt)) == ["bin", "etc", "var"]
        assert r.stderr.count("\n") <= 1                 # at most one warning
    finally:
        force_unmount(layers.mnt)
    r = run([FUSE_UNIONFS, "--version"])
    assert r.returncode == 0 and r.stdout.startswith("fuse-unionfs: version ")


# mount(8) runs its helpers without $PATH, so mount.fuse's /bin/sh searches
# its default PATH, which starts with these two directories.
MOUNT_HELPER_DIRS = ("/usr/local/sbin", "/usr/local/bin")

# Runs in a private mount namespace: the checkout's fuse-unionfs (in "$1") is
# bind-mounted over the helper directories, hiding whatever the host has there.
MOUNT8_SCRIPT = """
set -e
for d in {dirs}; do mount --bind "$1" "$d"; done
mount -t fuse.fuse-unionfs fuse-unionfs "$2" -o "$3"
trap 'umount "$2" 2>/dev/null || true' EXIT
ls "$2"
cat "$2/etc/hosts"
umount "$2"
echo unmounted
"""


@requires_root
def test_mount_through_mount_fuse(layers, tmp_path):
    """`mount -t fuse.fuse-unionfs` runs this checkout's fuse-unionfs: it is
    put on mount(8)'s helper PATH inside a private mount namespace, so
    nothing is installed on the host and no other copy can answer."""
    if not shutil.which("unshare"):
        pytest.fail("unshare not found: install util-linux")
    populate(layers)
    helper_dir = tmp_path / "helper-bin"
    helper_dir.mkdir()
    (helper_dir / "fuse-unionfs").symlink_to(FUSE_UNIONFS)
    script = MOUNT8_SCRIPT.format(dirs=" ".join(d for d in MOUNT_HELPER_DIRS if os.path.isdir(d)))
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(helper_dir), str(layers.mnt), layers.options()])
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["bin", "etc", "var", "10.0.0.1 top", "unmounted"]
        assert not is_mounted(layers.mnt)        # the mount lived in the namespace only
    finally:
        force_unmount(layers.mnt)


# -- bad input --------------------------------------------------------------------

def assert_user_error(r, needle):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", [
    "missing-lower", "lower-is-file", "upper-in-lower", "no-workdir",
    "unknown-option", "no-lowerdir", "missing-mountpoint", "mnt-in-lower",
    "work-other-fs", "bad-whiteout"])
def test_bad_input_is_one_line_and_mounts_nothing(layers, case):
    lo = ":".join(map(str, layers.lowers))
    up, wk, mnt = layers.upper, layers.work, layers.mnt
    (layers.base / "file").write_text("x")
    # A workdir on another filesystem: a directory of our own on /dev/shm.
    other_fs = Path(tempfile.mkdtemp(prefix="unionfs-otherfs-", dir="/dev/shm")) \
        if case == "work-other-fs" else None
    opts, target, needle = {
        "missing-lower": (f"lowerdir={layers.base}/nope,upperdir={up},workdir={wk}", mnt, "no such directory"),
        "lower-is-file": (f"lowerdir={layers.base}/file", mnt, "not a directory"),
        "upper-in-lower": (f"lowerdir={layers.base},upperdir={up},workdir={wk}", mnt, "overlaps"),
        "no-workdir": (f"lowerdir={lo},upperdir={up}", mnt, "workdir"),
        "unknown-option": (f"lowerdir={lo},frobnicate=1", mnt, "unknown mount option"),
        "no-lowerdir": (f"upperdir={up},workdir={wk}", mnt, "lowerdir"),
        "missing-mountpoint": (f"lowerdir={lo}", layers.base / "nomnt", "no such directory"),
        "mnt-in-lower": (f"lowerdir={lo}", layers.lowers[0], "overlaps"),
        "work-other-fs": (f"lowerdir={lo},upperdir={up},workdir={other_fs}", mnt, "same filesystem"),
        "bad-whiteout": (f"lowerdir={lo},whiteout=aufs", mnt, "whiteout"),
    }[case]
    before = sorted(os.listdir(up)), sorted(os.listdir(wk))
    r = run([UNIONFS, "mount", "-o", opts, str(target)])
    try:
        assert_user_error(r, needle)
        assert not is_mounted(target)
        assert (sorted(os.listdir(up)), sorted(os.listdir(wk))) == before
        assert other_fs is None or os.listdir(other_fs) == []
    finally:
        force_unmount(target)
        if other_fs is not None:
            shutil.rmtree(other_fs)


def test_cli_usage_errors_are_one_line(layers):
    assert_user_error(run([UNIONFS, "umount", str(layers.mnt)]), "not a FUSE mount")
    assert_user_error(run([UNIONFS, "mount", "--bogus", str(layers.mnt)]), "unrecognized")
    assert_user_error(run([UNIONFS, "frobnicate"]), "invalid choice")


def test_umount_reports_a_dead_daemon(layers, mounted):
    populate(layers)
    mnt = mounted()
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                    "zombie" in Path(f"/proc/{pid}/status").read_text())
    r = run([UNIONFS, "umount", str(mnt)], timeout=30)
    assert_user_error(r, "daemon had died")
    assert not is_mounted(mnt)


def test_pidfiles_of_dead_daemons_are_pruned_and_never_trusted(tmp_path, mounter):
    """A killed daemon leaves its pidfile; the next mount removes it, and a
    pidfile whose pid now belongs to another process is not believed."""
    from conftest import Layers
    from unionfs.mount import _daemon_pid, pidfile_for
    a, b = Layers(tmp_path / "a"), Layers(tmp_path / "b")
    mnt_a = mounter.mount(a)
    pidfile = Path(pidfile_for(mnt_a))
    pid, start = pidfile.read_text().split()
    assert int(pid) == _daemon_pid(mnt_a)
    os.kill(int(pid), signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                    "zombie" in Path(f"/proc/{pid}/status").read_text())
    run([UNIONFS, "umount", str(mnt_a)], timeout=30)       # the stale mount
    assert not is_mounted(mnt_a)
    assert pidfile.exists()
    # A live process that is not the daemon (this test) under that pid file.
    pidfile.write_text(f"{os.getpid()} {int(start) + 1}\n")
    assert _daemon_pid(mnt_a) is None
    mounter.mount(b)
    assert not pidfile.exists()
    assert Path(pidfile_for(b.mnt)).stat().st_mode & 0o777 == 0o644
