"""Opening a node whose name was unlinked meanwhile, on a real mount.

The kernel opens a node by the id it looked up, which may have lost its name
by the time the open arrives: an ``open(O_CREAT)`` racing an ``unlink`` of
the same name (a log writer and its rotator), or an open of
``/proc/self/fd/N`` of an unlinked file. Kernel overlayfs never fails the
first and opens the same file in the second; so must the mount.
"""

import errno
import os
import threading

import pytest

from conftest import requires_fuse

pytestmark = [requires_fuse, pytest.mark.fuse]


def test_open_creat_racing_unlink_of_the_same_name_never_fails(layers, mounted):
    mnt = mounted()
    path = os.path.join(mnt, "log")
    stop = threading.Event()
    unlinked = 0

    def rotate():
        nonlocal unlinked
        while not stop.is_set():
            try:
                os.unlink(path)
                unlinked += 1
            except FileNotFoundError:
                pass

    rotator = threading.Thread(target=rotate)
    rotator.start()
    failed = {}
    try:
        for _ in range(3000):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
            except OSError as e:
                failed[errno.errorcode[e.errno]] = failed.get(errno.errorcode[e.errno], 0) + 1
    finally:
        stop.set()
        rotator.join()
    assert unlinked > 0, "the names were never unlinked: no race happened"
    assert failed == {}


def _reopened(fd, flags):
    new = os.open(f"/proc/self/fd/{fd}", flags)
    try:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return os.read(new, 100)
        return os.write(new, b"!")
    finally:
        os.close(new)


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_an_unlinked_file_is_reopened_through_proc_fd(layers, mounted, passthrough):
    (layers.lowers[0] / "low").write_bytes(b"lower data")
    mnt = mounted(extra=f"passthrough={passthrough}")
    up = os.path.join(mnt, "up")
    with open(up, "wb") as f:
        f.write(b"upper data")
    held_up = os.open(up, os.O_RDONLY)
    held_low = os.open(os.path.join(mnt, "low"), os.O_RDONLY)
    try:
        os.unlink(up)
        os.unlink(os.path.join(mnt, "low"))
        assert _reopened(held_up, os.O_RDONLY) == b"upper data"
        assert _reopened(held_low, os.O_RDONLY) == b"lower data"
        if passthrough == "off":
            # As on kernel overlayfs. With passthrough the kernel's backing
            # file of the inode is the read-only one: refused (ESTALE).
            assert _reopened(held_up, os.O_WRONLY | os.O_APPEND) == 1
            assert os.pread(held_up, 100, 0) == b"upper data!"
        # A lower file is never written, whatever the way to it.
        with pytest.raises(OSError):
            _reopened(held_low, os.O_WRONLY | os.O_APPEND)
        # The descriptors held all along still work.
        assert os.fstat(held_up).st_nlink == 0
        assert os.pread(held_low, 100, 0) == b"lower data"
    finally:
        os.close(held_up)
        os.close(held_low)
    assert (layers.lowers[0] / "low").read_bytes() == b"lower data"


def test_fstat_after_unlink_while_another_open_of_the_file_was_closed(mounted):
    """Two opens of a file, the later one closed, the name unlinked: the
    first still answers fstat (the daemon knew only its latest open)."""
    mnt = mounted()
    path = os.path.join(mnt, "f")
    with open(path, "wb") as f:
        f.write(b"abc")
    first = os.open(path, os.O_RDONLY)
    try:
        os.close(os.open(path, os.O_RDONLY))
        os.unlink(path)
        assert os.fstat(first).st_size == 3
        assert os.pread(first, 10, 0) == b"abc"
    finally:
        os.close(first)
