"""A full or failing upper: the upper and work directories on a small tmpfs.

- a copy-up that does not fit fails with ENOSPC, the merged view still shows
  the intact lower file, and nothing of the attempt stays in upper or work;
- a write that does not fit fails with ENOSPC; once space is freed the mount
  works again;
- no inodes left: whiteouts and new names fail with ENOSPC and nothing changes;
- the upper turns read-only under a live mount (``mount -o remount,ro``):
  writes fail with EROFS, reads keep working, and after ``remount,rw`` the
  mount carries on.
"""

import errno
import hashlib
import os

import pytest

from conftest import Layers, requires_fuse, requires_root, run
from reliability_helpers import (alive, daemon_pid, file_digest, mount_cli, quick_unmount,
                                 small_tmpfs, unmount_any, work_leftovers)

pytestmark = [requires_fuse, requires_root, pytest.mark.fuse]

MiB = 1 << 20


@pytest.fixture
def tmpfs_layers(tmp_path):
    """Layers whose upper and work live on an 8 MiB tmpfs (lowers on disk);
    the union mount and then the tmpfs are unmounted afterwards."""
    lower_base = tmp_path / "disk"
    with small_tmpfs(tmp_path / "small", "8m,nr_inodes=4096") as fs:
        layers = Layers(lower_base)
        layers.upper = fs / "upper"
        layers.work = fs / "work"
        layers.upper.mkdir()
        layers.work.mkdir()
        layers.fs = fs
        try:
            yield layers
        finally:
            unmount_any(layers.mnt)


def free_bytes(path):
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


def write_random(path, size, seed=0):
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 32:] + block[:i % 32])


def expect_errno(code, fn, *a):
    with pytest.raises(OSError) as e:
        fn(*a)
    assert e.value.errno == code, f"{fn.__name__}: {e.value!r}, expected {errno.errorcode[code]}"


def assert_nothing_left(layers, allowed=()):
    assert work_leftovers(layers) == [], "a temporary stayed in the work directory"
    assert sorted(os.listdir(layers.upper)) == sorted(allowed), "partial entries in the upper"


def append(path, data):
    with open(path, "ab") as f:
        f.write(data)


def test_copy_up_that_does_not_fit_fails_cleanly(tmpfs_layers):
    layers = tmpfs_layers
    lower = layers.lowers[0]
    write_random(lower / "big", 12 * MiB)
    (lower / "small").write_text("small\n")
    digest = file_digest(lower / "big")
    mnt = mount_cli(layers)
    free = free_bytes(layers.fs)

    expect_errno(errno.ENOSPC, append, mnt / "big", b"more")
    expect_errno(errno.ENOSPC, os.truncate, mnt / "big", 11 * MiB)
    expect_errno(errno.ENOSPC, os.chmod, mnt / "big", 0o600)
    assert file_digest(mnt / "big") == digest
    assert os.stat(mnt / "big").st_size == 12 * MiB
    assert_nothing_left(layers)
    assert free_bytes(layers.fs) == free, "space leaked"

    # The mount still works: small copy-ups and new files fit.
    append(mnt / "small", b"appended\n")
    (mnt / "new").write_text("new\n")
    assert (mnt / "small").read_text() == "small\nappended\n"
    assert (mnt / "new").read_text() == "new\n"
    # A copy-up that needs no data (truncate to 0) fits too.
    os.truncate(mnt / "big", 0)
    assert os.stat(mnt / "big").st_size == 0
    assert file_digest(lower / "big") == digest
    quick_unmount(mnt)


def test_write_that_does_not_fit_then_space_is_freed(tmpfs_layers):
    layers = tmpfs_layers
    lower = layers.lowers[0]
    (lower / "log").write_text("line 0\n")
    write_random(lower / "medium", 3 * MiB, seed=1)
    medium = file_digest(lower / "medium")
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)

    # Fill the upper through the mount until the write fails.
    with pytest.raises(OSError) as e:
        with open(mnt / "fill", "wb") as f:
            for _ in range(16):
                f.write(b"\xaa" * MiB)
                f.flush()
            os.fsync(f.fileno())
    assert e.value.errno == errno.ENOSPC, e.value
    assert free_bytes(layers.fs) < 64 * 1024
    # Now nothing fits: copy-ups fail and leave nothing behind.
    expect_errno(errno.ENOSPC, append, mnt / "medium", b"x")
    assert file_digest(mnt / "medium") == medium
    assert_nothing_left(layers, allowed=["fill"])
    assert alive(pid)

    # Free the space: everything works again.
    os.unlink(mnt / "fill")
    append(mnt / "medium", b"tail")
    append(mnt / "log", b"line 1\n")
    assert (mnt / "log").read_text() == "line 0\nline 1\n"
    with open(mnt / "medium", "rb") as f:
        data = f.read()
    assert len(data) == 3 * MiB + 4 and data.endswith(b"tail")
    assert hashlib.sha256(data[:-4]).hexdigest() == medium
    assert file_digest(lower / "medium") == medium
    assert work_leftovers(layers) == []
    quick_unmount(mnt)


@pytest.mark.parametrize("whiteout", ["overlay", "oci"])
def test_no_inodes_left(tmpfs_layers, whiteout):
    layers = tmpfs_layers
    lower = layers.lowers[0]
    (lower / "doomed").write_text("still here\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "f").write_text("f\n")
    (lower / "gone").write_text("gone\n")
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)
    os.unlink(mnt / "gone")                 # a whiteout while there is room
    os.mkdir(mnt / "fillers")
    # Use up every inode of the tmpfs.
    n = 0
    with pytest.raises(OSError) as e:
        while True:
            open(mnt / "fillers" / f"{n}", "w").close()
            n += 1
    assert e.value.errno == errno.ENOSPC, e.value
    before = sorted(os.listdir(mnt)), sorted(os.listdir(mnt / "dir"))

    expect_errno(errno.ENOSPC, os.unlink, mnt / "doomed")           # needs a whiteout
    expect_errno(errno.ENOSPC, os.rename, mnt / "dir", mnt / "moved")
    expect_errno(errno.ENOSPC, os.mkdir, mnt / "gone")               # over a whiteout
    expect_errno(errno.ENOSPC, append, mnt / "doomed", b"x")         # copy-up
    assert (sorted(os.listdir(mnt)), sorted(os.listdir(mnt / "dir"))) == before
    assert (mnt / "doomed").read_text() == "still here\n"
    assert (mnt / "dir" / "f").read_text() == "f\n"
    assert not os.path.lexists(mnt / "gone")
    assert work_leftovers(layers) == []
    assert alive(pid)

    for i in range(n):
        os.unlink(mnt / "fillers" / f"{i}")
    os.unlink(mnt / "doomed")
    os.rename(mnt / "dir", mnt / "moved")
    os.mkdir(mnt / "gone")
    assert sorted(os.listdir(mnt)) == ["fillers", "gone", "moved"]
    assert os.listdir(mnt / "gone") == []
    assert (mnt / "moved" / "f").read_text() == "f\n"
    quick_unmount(mnt)


def remount(fs, mode):
    r = run(["mount", "-o", f"remount,{mode}", str(fs)])
    assert r.returncode == 0, r.stderr


def test_upper_turns_read_only_under_a_live_mount(tmpfs_layers):
    layers = tmpfs_layers
    lower = layers.lowers[0]
    (lower / "etc").mkdir()
    (lower / "etc" / "conf").write_text("lower conf\n")
    (lower / "data").write_text("lower data\n")
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    (mnt / "mine").write_text("upper file\n")
    os.mkdir(mnt / "mydir")
    try:
        remount(layers.fs, "ro")
        # Every kind of change fails with EROFS; nothing changes.
        expect_errno(errno.EROFS, append, mnt / "mine", b"x")
        expect_errno(errno.EROFS, append, mnt / "data", b"x")               # copy-up
        expect_errno(errno.EROFS, lambda: (mnt / "new").write_text("x"))
        expect_errno(errno.EROFS, os.mkdir, mnt / "etc" / "sub")
        expect_errno(errno.EROFS, os.unlink, mnt / "data")                  # whiteout
        expect_errno(errno.EROFS, os.unlink, mnt / "mine")
        expect_errno(errno.EROFS, os.rename, mnt / "etc", mnt / "etc2")
        expect_errno(errno.EROFS, os.rmdir, mnt / "mydir")
        expect_errno(errno.EROFS, os.chmod, mnt / "mine", 0o600)
        expect_errno(errno.EROFS, os.setxattr, mnt / "data", "user.x", b"1")
        # Reads keep working.
        assert (mnt / "etc" / "conf").read_text() == "lower conf\n"
        assert (mnt / "mine").read_text() == "upper file\n"
        assert sorted(os.listdir(mnt)) == ["data", "etc", "mine", "mydir"]
        assert alive(pid)
    finally:
        remount(layers.fs, "rw")
    append(mnt / "data", b"more\n")
    os.rename(mnt / "etc", mnt / "etc2")
    os.unlink(mnt / "mine")
    assert (mnt / "data").read_text() == "lower data\nmore\n"
    assert sorted(os.listdir(mnt)) == ["data", "etc2", "mydir"]
    assert (mnt / "etc2" / "conf").read_text() == "lower conf\n"
    assert work_leftovers(layers) == []
    quick_unmount(mnt)
