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


# chmod and utimes of a path without following a final symlink, in one
# system call each. glibc's fchmodat(AT_SYMLINK_NOFOLLOW) costs four
# (open O_PATH, fstat, chmod of /proc/self/fd/N, close), and os.utime
# cannot leave one of the two times as it is (UTIME_OMIT), so callers
# would lstat first. Every chmod, chown and touch of the merged view pays
# these (an untar: three per file).
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_NR_FCHMODAT2 = {"x86_64": 452, "aarch64": 452}.get(os.uname().machine)
_AT_SYMLINK_NOFOLLOW = 0x100
_have_fchmodat2 = _NR_FCHMODAT2 is not None


def lchmod(path, mode, dir_fd=_AT_FDCWD):
    """chmod(2) of ``path`` itself (EOPNOTSUPP for a symlink, as Linux),
    relative to ``dir_fd``."""
    global _have_fchmodat2
    if _have_fchmodat2:
        # (a DirFd converts to its number; the caller holds it for the call)
        if _syscall(_NR_FCHMODAT2, ctypes.c_int(dir_fd.__index__()), os.fsencode(path), ctypes.c_uint(mode),
                    _AT_SYMLINK_NOFOLLOW) == 0:
            return
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e), path)
        _have_fchmodat2 = False         # Linux before 6.6
    try:
        os.chmod(path, mode, follow_symlinks=False,
                 dir_fd=None if dir_fd == _AT_FDCWD else dir_fd)
    except NotImplementedError:         # glibc's answer for a symlink
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path) from None


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_OMIT = (1 << 30) - 2
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_timespec), ctypes.c_int]


def lutimes_ns(path, atime_ns, mtime_ns, dir_fd=_AT_FDCWD):
    """Set the times of ``path`` itself (a symlink is not followed),
    relative to ``dir_fd``; None for either leaves it as it is (UTIME_OMIT)."""
    times = (_timespec * 2)()
    for t, ns in zip(times, (atime_ns, mtime_ns)):
        if ns is None:
            t.tv_nsec = _UTIME_OMIT
        else:
            t.tv_sec, t.tv_nsec = divmod(ns, 1_000_000_000)
    if _utimensat(dir_fd.__index__(), os.fsencode(path), times, _AT_SYMLINK_NOFOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
