"""System calls the standard library does not offer."""

import ctypes
import errno
import os

_AT_FDCWD = -100
RENAME_NOREPLACE = 1 << 0       # renameat2's flags (linux/fs.h)
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename2(a, b, flags, a_dir_fd=_AT_FDCWD, b_dir_fd=_AT_FDCWD):
    """renameat2(2) of ``a`` (relative to directory fd ``a_dir_fd``) to
    ``b`` (relative to ``b_dir_fd``) with ``flags``."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(a_dir_fd, os.fsencode(a), b_dir_fd, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


_CLONE_FS = 0x00000200
_unshare = getattr(_libc, "unshare", None)


def unshare_fs():
    """Give the calling thread its own working directory, root and umask
    (unshare(CLONE_FS)): a chdir in it no longer moves the other threads.
    False where that is not allowed."""
    return _unshare is not None and _unshare(_CLONE_FS) == 0


_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd, off, count):
    """Start writing ``count`` bytes of ``fd`` at ``off`` to disk, without
    waiting (sync_file_range's WRITE). A hint: does nothing where it is not
    available. A later fsync still makes the data durable."""
    if _sync_file_range is not None:
        _sync_file_range(fd, off, count, _SYNC_FILE_RANGE_WRITE)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state first),
    or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields if len(fields) > 19 else None


def proc_start(pid):
    """The start time of process ``pid`` (field 22 of /proc/PID/stat, clock
    ticks since boot), or None if there is none. With the pid it names one
    process for good: a later process that gets the same pid starts later."""
    fields = proc_stat(pid)
    return fields[19] if fields else None
