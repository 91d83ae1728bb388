"""Helpers shared by the reliability tests (tests/test_reliability_*.py).

- the daemon of a mount: its pid, killing it, telling whether it is alive
  (a zombie counts as dead: the sandbox's init may reap it late);
- removing a mount whose daemon was killed, through ``unionfs umount``;
- snapshots of a tree (bytes names, content hashes) to compare states;
- a small tmpfs to put an upper on (root only);
- a 0755 base directory other users can reach (tmp_path is 0700);
- kernel overlayfs on a layer tree, for side-by-side runs.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import IS_ROOT, UNIONFS, force_unmount, is_mounted, run, wait_for

PY = sys.executable


@pytest.fixture(autouse=True)
def unmount_layers_after(request):
    """Import into a test module (autouse): whatever a test mounted on its
    ``layers.mnt`` -- through the CLI, killed, or kernel overlayfs -- is gone
    after it, even when it failed halfway."""
    layers = request.getfixturevalue("layers") if "layers" in request.fixturenames else None
    yield
    if layers is not None:
        unmount_any(layers.mnt)


# -- the daemon ---------------------------------------------------------------

def daemon_pid(mnt):
    from unionfs.mount import pidfile_for
    return int(Path(pidfile_for(str(mnt))).read_text().split()[0])


def alive(pid):
    """True while ``pid`` runs (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def kill_daemon(mnt, pid=None):
    """SIGKILL the daemon of ``mnt``; return once it is dead."""
    pid = pid or daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid), timeout=10), f"daemon {pid} survived SIGKILL"
    return pid


def umount_dead(mnt):
    """``unionfs umount`` on a mount whose daemon is dead; returns its
    CompletedProcess (checked by the callers that test the message)."""
    return run([UNIONFS, "umount", str(mnt)], timeout=30)


def assert_reports_dead_daemon(r, mnt):
    """``unionfs umount`` of a dead mount must say so in one line, exit
    non-zero, and leave nothing mounted."""
    assert r.returncode != 0, "umount of a dead mount claimed success"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "daemon had died" in lines[0], r.stderr
    assert not is_mounted(mnt)


def remove_dead_mount(mnt):
    """Clean up after a killed daemon: ``unionfs umount``, and ``umount -l``
    if that left the mount (the reporting itself is tested in
    test_reliability_resources.py). Returns True if ``unionfs umount`` did it."""
    r = umount_dead(mnt)
    if not is_mounted(mnt):
        return True
    run(["umount", "-l", str(mnt)] if IS_ROOT else ["fusermount", "-u", "-z", str(mnt)])
    assert not is_mounted(mnt), f"cannot remove the dead mount: {r.stderr}"
    return False


def quick_unmount(mnt):
    """Unmount a healthy mount without waiting for the zombie to be reaped:
    the kernel unmount, then wait until the daemon has exited."""
    pid = daemon_pid(mnt)
    r = run(["umount", str(mnt)] if IS_ROOT else ["fusermount", "-u", str(mnt)], timeout=30)
    assert r.returncode == 0, r.stderr
    # A bound, not a timing check: under load (two cores, load 8) an exit
    # was seen to take over 10 s.
    assert wait_for(lambda: not alive(pid), timeout=60), "daemon did not exit on unmount"


def mount_cli(layers, extra="", mnt=None):
    mnt = Path(mnt or layers.mnt)
    r = run([UNIONFS, "mount", "-o", layers.options(True, extra), str(mnt)], timeout=30)
    assert r.returncode == 0, f"mount failed: {r.stderr.strip()}"
    assert is_mounted(mnt)
    return mnt


# -- snapshots --------------------------------------------------------------------

def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def xattrs_of(path):
    """((name, value), ...) of ``path``'s xattrs (symlinks not followed)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in sorted(names))


def snapshot(root, content=True):
    """{relative bytes path: description} of every entry below ``root``:
    ("d", mode, xattrs), ("f", mode, size, sha256, xattrs), ("l", target),
    ("o", type)."""
    out = {}
    root = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", mode, xattrs_of(p))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", mode, st.st_size, file_digest(p) if content else None,
                            xattrs_of(p))
            else:
                out[rel] = ("o", stat.S_IFMT(st.st_mode))
    return out


def describe_diff(got, want):
    """A short text of how snapshot ``got`` differs from ``want``."""
    lines = []
    for k in sorted(set(got) | set(want)):
        if got.get(k) != want.get(k):
            lines.append(f"{k!r}: got {got.get(k)!r}, want {want.get(k)!r}")
    return "\n".join(lines[:20]) + (f"\n... {len(lines) - 20} more" if len(lines) > 20 else "")


def work_leftovers(layers):
    d = layers.work / "unionfs-work"
    return sorted(os.listdir(d)) if d.exists() else []


# -- a small tmpfs ----------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path, size="8m"):
    """A tmpfs of ``size`` at ``path`` (root only), unmounted afterwards even
    if a unionfs mount on top of it is still there (that one first)."""
    os.makedirs(path, exist_ok=True)
    r = run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)])
    assert r.returncode == 0, r.stderr
    try:
        yield Path(path)
    finally:
        if is_mounted(path):
            r = run(["umount", str(path)], timeout=30)
            if r.returncode != 0:
                run(["umount", "-l", str(path)], timeout=30)


# -- another user ---------------------------------------------------------------

@contextlib.contextmanager
def shared_base(prefix="unionfs-rel-"):
    """A 0755 directory under /tmp (pytest's tmp_path is 0700: other users
    could not reach a mount inside it). Removed afterwards."""
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield Path(base)
    finally:
        for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
            mp = line.split()[4]
            if mp.startswith(base + "/"):
                force_unmount(mp)
                if is_mounted(mp):
                    run(["umount", "-l", mp])
        shutil.rmtree(base, ignore_errors=True)


# -- kernel overlayfs -------------------------------------------------------------

def kernel_overlay_available():
    if not IS_ROOT:
        return False
    def listed():
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    if not listed():
        subprocess.run(["modprobe", "overlay"], capture_output=True, timeout=30)
    return listed()


def mount_kernel_overlay(layers, mnt=None):
    """Kernel overlayfs on ``layers``, with redirect_dir=on so that lower
    directories can be renamed (unionfs never answers EXDEV), and index=on
    so that lower hard links stay one file (as on unionfs)."""
    mnt = Path(mnt or layers.mnt)
    lower = ":".join(map(str, layers.lowers))
    r = run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={layers.upper},workdir={layers.work},"
             "redirect_dir=on,index=on", str(mnt)])
    assert r.returncode == 0, r.stderr
    return mnt


def unmount_any(mnt):
    """Unmount whatever is at ``mnt`` (unionfs or kernel overlay), for teardown."""
    if not is_mounted(mnt):
        return
    with open("/proc/self/mountinfo") as f:
        fuse = any(l.split()[4] == os.path.realpath(mnt) and " - fuse" in l for l in f)
    if fuse:
        force_unmount(mnt)
    else:
        r = run(["umount", str(mnt)], timeout=30)
        if r.returncode != 0:
            run(["umount", "-l", str(mnt)], timeout=30)
