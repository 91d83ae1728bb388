"""System calls the standard library does not offer."""

import ctypes
import errno
import os

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_exchange(a, b):
    """Atomically swap the entries at paths ``a`` and ``b`` (renameat2)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                  _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)
