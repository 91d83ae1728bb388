"""An unprivileged user mounts, changes and unmounts, as rootless container
engines use fuse-overlayfs: the mount goes through the set-uid fusermount,
the daemon runs as that user, opaque directories get
``user.overlay.opaque`` (a user may not set ``trusted.*`` xattrs), and the
upper stays mountable by kernel overlayfs with ``userxattr``.

Root is needed only to set the scene and inspect the result; every unionfs
command runs as the user (``setpriv``). Where /dev/fuse is root-only (this
sandbox: mode 0600; distributions ship it 0666), libfuse cannot open it for
a user -- fuse-overlayfs fails the same way -- so the user runs in a private
mount namespace where a 0666 node of the same device is bound over
/dev/fuse; nothing outside that namespace changes.
"""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, kernel_overlay_refusal, requires_fuse

pytestmark = [requires_fuse, pytest.mark.fuse]

UID = GID = 65534          # nobody / nogroup
REPO = Path(__file__).resolve().parent.parent
SITE = sysconfig.get_paths()["purelib"]     # fusepy, xattr (the venv's)

# Runs as the user inside the namespace: mount with the CLI, change things,
# report what the user sees, unmount with the CLI.
USER_SCRIPT = r"""
import json, os, subprocess, sys
repo, site, lower, upper, work, m = sys.argv[1:7]
boot = ("import sys; sys.path[:0] = [%r, %r]; from unionfs.cli import main; "
        "sys.exit(main(sys.argv[1:]))" % (repo, site))
cli = [sys.executable, "-c", boot]
out = {}
r = subprocess.run(cli + ["mount", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", m],
                   capture_output=True, text=True, timeout=60)
out["mount"] = [r.returncode, r.stderr.strip()]
if r.returncode == 0:
    try:
        with open("/proc/self/mountinfo") as f:
            out["mountinfo"] = next(ln for ln in f if ln.split()[4] == m)
        open(m + "/new", "w").write("new\n")
        open(m + "/grow", "a").write("more\n")
        os.unlink(m + "/gone")
        os.unlink(m + "/d/old")
        os.rmdir(m + "/d")
        os.mkdir(m + "/d")
        open(m + "/d/fresh", "w").write("fresh\n")
        out["seen"] = [sorted(os.listdir(m)), os.listdir(m + "/d"), open(m + "/grow").read(),
                       os.stat(m + "/new").st_uid]
    except Exception as e:
        out["error"] = repr(e)
    r = subprocess.run(cli + ["umount", m], capture_output=True, text=True, timeout=60)
    out["umount"] = [r.returncode, r.stderr.strip()]
print(json.dumps(out))
"""


def _python_for_user():
    """An interpreter of this Python version the unprivileged user may run,
    and run again from itself (the CLI starts the daemon that way): this
    one, or the system's (the venv's may point into a private /root)."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    again = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', '']).returncode)"
    for exe in (sys.executable, shutil.which(want, path="/usr/bin:/usr/local/bin")):
        try:
            if exe and subprocess.run(
                    ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--",
                     exe, "-c", again], capture_output=True, timeout=30).returncode == 0:
                return exe
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _why_not():
    if not IS_ROOT:
        return "needs root to act as another user (setpriv) and to set up the namespace"
    for tool in ("setpriv", "unshare"):
        if not shutil.which(tool):
            return f"{tool} (util-linux) is missing"
    fm = shutil.which("fusermount3") or shutil.which("fusermount")
    if not fm or not os.stat(fm).st_mode & stat.S_ISUID:
        return "no set-uid fusermount: unprivileged users cannot mount FUSE here"
    if _python_for_user() is None:
        return f"no python{sys.version_info.major}.{sys.version_info.minor} the user may run"
    return None


@pytest.fixture
def tree():
    """Layers in a directory the user can reach (pytest's tmp_path is
    root-only); the upper, work dir and mount point belong to the user.
    Afterwards: any daemon of the user's still running (its pidfile) is
    ended, and the tree removed."""
    base = Path(tempfile.mkdtemp(prefix="unionfs-rootless-"))
    os.chmod(base, 0o755)
    for n in ("lower", "upper", "work", "mnt", "run"):
        (base / n).mkdir()
    for n in ("upper", "work", "mnt", "run"):
        os.chown(base / n, UID, GID)
    lower = base / "lower"
    (lower / "keep").write_text("keep\n")
    (lower / "gone").write_text("gone\n")
    (lower / "d").mkdir()
    (lower / "d" / "old").write_text("old\n")
    (lower / "grow").write_text("lower\n")
    for p in lower.rglob("*"):      # an image unpacked by the user, as rootless engines do
        os.chown(p, UID, GID)
    try:
        yield base
    finally:
        for pidfile in (base / "run").glob("unionfs-*/*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
            except (OSError, ValueError):
                pass
        if (base / "kmnt").is_dir() and os.path.ismount(base / "kmnt"):
            subprocess.run(["umount", "-l", str(base / "kmnt")], timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_unprivileged_user_mounts_changes_and_unmounts(tree):
    why = _why_not()
    if why:
        pytest.skip(why)
    py = _python_for_user()
    lower, upper, work, mnt, run = (tree / n for n in ("lower", "upper", "work", "mnt", "run"))
    script = tree / "user.py"
    script.write_text(USER_SCRIPT)
    env = {"PATH": os.environ["PATH"], "HOME": str(run), "XDG_RUNTIME_DIR": str(run),
           "LANG": "C.UTF-8"}
    fuse_st = os.stat("/dev/fuse")
    node = tree / "fuse"
    setup = ""
    if fuse_st.st_mode & 0o006 != 0o006:        # root-only here: see the module doc
        os.mknod(node, stat.S_IFCHR | 0o666, fuse_st.st_rdev)
        os.chmod(node, 0o666)
        setup = f"mount --bind {node} /dev/fuse && "
    user = (f"exec setpriv --reuid={UID} --regid={GID} --clear-groups -- "
            f"{py} {script} {REPO} {SITE} {lower} {upper} {work} {mnt}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                        "sh", "-c", setup + user], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mount"] == [0, ""], out
    assert "error" not in out, out
    assert out["umount"] == [0, ""], out
    assert f"user_id={UID}" in out["mountinfo"]          # the daemon is the user's
    # An unprivileged mount keeps the safe defaults root's mounts drop.
    assert {"nosuid", "nodev"} <= set(out["mountinfo"].split()[5].split(","))
    assert out["seen"] == [["d", "grow", "keep", "new"], ["fresh"], "lower\nmore\n", UID]
    assert list((run).glob("unionfs-*/*.pid")) == []      # the daemon is gone

    # What the user's daemon left in the upper: the user's files, a 0/0
    # whiteout (no CAP_MKNOD needed for it since Linux 5.8), the opaque mark
    # as a user xattr; the lower untouched.
    assert (upper / "new").stat().st_uid == UID
    assert (upper / "grow").read_text() == "lower\nmore\n"
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    with pytest.raises(OSError) as e:
        os.getxattr(upper / "d", "trusted.overlay.opaque")
    assert e.value.errno == errno.ENODATA
    assert (lower / "gone").exists() and (lower / "d" / "old").exists()
    assert (lower / "grow").read_text() == "lower\n"

    # Kernel overlayfs, told to read user.overlay.* xattrs, sees the same tree.
    why = kernel_overlay_refusal(tree / "probe", "userxattr")
    if why:
        pytest.skip(f"kernel overlayfs with userxattr unavailable: {why}")
    kmnt, kwork = tree / "kmnt", tree / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={kwork},userxattr",
                        str(kmnt)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"kernel overlayfs refuses the upper unionfs wrote: {r.stderr}"
    try:
        assert sorted(os.listdir(kmnt)) == ["d", "grow", "keep", "new"]
        assert os.listdir(kmnt / "d") == ["fresh"]
        assert (kmnt / "grow").read_text() == "lower\nmore\n"
    finally:
        subprocess.run(["umount", str(kmnt)], timeout=30)
