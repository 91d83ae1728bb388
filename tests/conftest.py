"""Shared fixtures: layer trees on tmp_path, and real mounts through the CLI.

Every mount made here is unmounted at teardown, whatever the test did: first
``unionfs umount`` (with a timeout), then a lazy ``umount -l`` as a last
resort, so a failing test never leaves a mount behind.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
UNIONFS = str(BIN / "unionfs")
FUSE_UNIONFS = str(BIN / "fuse-unionfs")
IS_ROOT = os.geteuid() == 0


def fuse_missing_reason():
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        import fuse  # noqa: F401
    except (OSError, ImportError) as e:
        return f"libfuse2 is not loadable: {e}"
    if not shutil.which("fusermount") and not IS_ROOT:
        return "fusermount is missing"
    return None


requires_fuse = pytest.mark.skipif(fuse_missing_reason() is not None,
                                   reason=fuse_missing_reason() or "")
requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def write(path, data="", mode=None):
    """A file at ``path`` (a Path) with ``data``, its directories made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    if mode is not None:
        path.chmod(mode)


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def run(cmd, timeout=60, check=False, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          check=check, **kw)


def force_unmount(path):
    if not is_mounted(path):
        return
    try:
        run([UNIONFS, "umount", str(path)], timeout=30)
    except subprocess.TimeoutExpired:
        pass
    if is_mounted(path):
        run(["umount", "-l", str(path)] if IS_ROOT else ["fusermount", "-u", "-z", str(path)],
            timeout=30)


def kernel_overlay_refusal(base, extra=""):
    """Why kernel overlayfs cannot mount a fresh, empty tree under ``base``
    (with the options ``extra``), or None if it can. Tests that hand kernel
    overlayfs an upper that unionfs wrote ask this first: a refusal here is
    the environment's; a refusal of our upper after it is our bug."""
    base = Path(base)
    dirs = {n: base / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir(parents=True)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    r = run(["mount", "-t", "overlay", "overlay", "-o", opts + ("," + extra if extra else ""),
             str(dirs["mnt"])])
    if r.returncode != 0:
        return r.stderr.strip() or f"mount exit {r.returncode}"
    run(["umount", str(dirs["mnt"])], check=True)
    return None


class Layers:
    """A tmp_path tree: lowers l0 (top) .. lN, upper, work, mnt."""

    def __init__(self, base, nlower=2):
        self.base = Path(base)
        self.lowers = [self.base / f"l{i}" for i in range(nlower)]
        self.upper = self.base / "upper"
        self.work = self.base / "work"
        self.mnt = self.base / "mnt"
        for d in self.lowers + [self.upper, self.work, self.mnt]:
            d.mkdir(parents=True, exist_ok=True)

    def options(self, upper=True, extra=""):
        o = "lowerdir=" + ":".join(map(str, self.lowers))
        if upper:
            o += f",upperdir={self.upper},workdir={self.work}"
        return o + ("," + extra if extra else "")


class Mounter:
    """Mounts through the real CLI; remembers every mount for teardown."""

    def __init__(self):
        self.mounted = []

    def mount(self, layers, upper=True, extra="", mnt=None, timeout=30):
        mnt = Path(mnt or layers.mnt)
        r = run([UNIONFS, "mount", "-o", layers.options(upper, extra), str(mnt)],
                timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"mount failed: {r.stderr.strip()}")
        self.mounted.append(mnt)
        assert is_mounted(mnt)
        return mnt

    def umount(self, mnt):
        r = run([UNIONFS, "umount", str(mnt)], timeout=30)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)

    def cleanup(self):
        for mnt in self.mounted:
            force_unmount(mnt)


@pytest.fixture
def layers(tmp_path):
    return Layers(tmp_path)


@pytest.fixture
def mounter():
    m = Mounter()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def mounted(layers, mounter):
    """A read-write mount of ``layers`` (populate the lowers before use:
    tests call ``mounted()`` after building their tree)."""
    def do(upper=True, extra=""):
        return mounter.mount(layers, upper=upper, extra=extra)
    return do


def wait_for(pred, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
