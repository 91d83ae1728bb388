"""ctypes binding of libfuse2's *low-level* API (fuse_lowlevel.h).

fusepy binds only libfuse's high-level, path-based API, in which every path
is its own kernel inode: two names of one hard link are two inodes with two
attribute caches, and an open file whose name is gone cannot be stat'ed. The
low-level API lets the daemon choose inode numbers, so unionfs gives the
kernel one inode per file, as overlayfs does. This module is only the
binding: structures, function prototypes and the session loop. The
operations live in ``fs.py``.

The library is the one fusepy loads (libfuse.so.2); fusepy's per-architecture
``c_stat``, ``c_statvfs`` and ``fuse_file_info`` layouts are reused.
"""

import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_double, c_int, c_size_t,
                    c_uint, c_uint64, c_ulong, c_void_p)

import fuse as _fusepy

lib = _fusepy._libfuse
c_stat = _fusepy.c_stat
c_statvfs = _fusepy.c_statvfs
fuse_file_info = _fusepy.fuse_file_info
c_off_t = _fusepy.c_off_t
c_mode_t = _fusepy.c_mode_t
c_dev_t = _fusepy.c_dev_t
c_uid_t = _fusepy.c_uid_t
c_gid_t = _fusepy.c_gid_t
c_pid_t = _fusepy.c_pid_t

fuse_ino_t = c_uint64
fuse_req_t = c_void_p
ROOT_ID = 1

# setattr's to_set bits
SET_ATTR_MODE = 1 << 0
SET_ATTR_UID = 1 << 1
SET_ATTR_GID = 1 << 2
SET_ATTR_SIZE = 1 << 3
SET_ATTR_ATIME = 1 << 4
SET_ATTR_MTIME = 1 << 5
SET_ATTR_ATIME_NOW = 1 << 7
SET_ATTR_MTIME_NOW = 1 << 8

# fuse_conn_info.want / capable bits (libfuse 2.9)
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_EXPORT_SUPPORT = 1 << 4
CAP_BIG_WRITES = 1 << 5


class fuse_args(ctypes.Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


# glibc's struct stat ends in reserved words that fusepy's c_stat leaves out.
# That is harmless where libfuse hands us a pointer, but fuse_entry_param
# embeds a struct stat by value: without the tail, libfuse would read the
# timeouts from the reserved words (as 0, disabling all kernel caching).
_STAT_SIZE = {"x86_64": 144, "aarch64": 128, "ppc64le": 144, "ppc64": 144}.get(
    os.uname().machine, ctypes.sizeof(c_stat))


class fuse_entry_param(ctypes.Structure):
    _fields_ = [("ino", fuse_ino_t), ("generation", c_ulong), ("attr", c_stat),
                ("_stat_tail", ctypes.c_char * (_STAT_SIZE - ctypes.sizeof(c_stat))),
                ("attr_timeout", c_double), ("entry_timeout", c_double)]


class fuse_ctx(ctypes.Structure):
    _fields_ = [("uid", c_uid_t), ("gid", c_gid_t), ("pid", c_pid_t),
                ("umask", c_mode_t)]


class fuse_conn_info(ctypes.Structure):
    _fields_ = [("proto_major", c_uint), ("proto_minor", c_uint),
                ("async_read", c_uint), ("max_write", c_uint),
                ("max_readahead", c_uint), ("capable", c_uint), ("want", c_uint),
                ("max_background", c_uint), ("congestion_threshold", c_uint),
                ("reserved", c_uint * 23)]


# struct fuse_buf / fuse_bufvec (libfuse 2.9): data described by memory or
# by a file descriptor, so libfuse moves file data itself, in C.
BUF_IS_FD = 1 << 1
BUF_FD_SEEK = 1 << 2


class fuse_buf(ctypes.Structure):
    _fields_ = [("size", c_size_t), ("flags", c_int), ("mem", c_void_p),
                ("fd", c_int), ("pos", c_off_t)]


class fuse_bufvec(ctypes.Structure):
    _fields_ = [("count", c_size_t), ("idx", c_size_t), ("off", c_size_t),
                ("buf", fuse_buf * 1)]


def fd_bufvec(fd, size, pos):
    """A one-buffer vector for ``size`` bytes of ``fd`` at offset ``pos``."""
    v = fuse_bufvec(1, 0, 0)
    b = v.buf[0]
    b.size = size
    b.flags = BUF_IS_FD | BUF_FD_SEEK
    b.fd = fd
    b.pos = pos
    return v


_FI = POINTER(fuse_file_info)
_REQ = fuse_req_t
_INO = fuse_ino_t

# struct fuse_lowlevel_ops, in order (libfuse 2.9). Entries we do not
# implement stay NULL, and libfuse answers ENOSYS (or does the sane default).
OPS = [
    ("init", CFUNCTYPE(None, c_void_p, POINTER(fuse_conn_info))),
    ("destroy", CFUNCTYPE(None, c_void_p)),
    ("lookup", CFUNCTYPE(None, _REQ, _INO, c_char_p)),
    ("forget", CFUNCTYPE(None, _REQ, _INO, c_ulong)),
    ("getattr", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("setattr", CFUNCTYPE(None, _REQ, _INO, POINTER(c_stat), c_int, _FI)),
    ("readlink", CFUNCTYPE(None, _REQ, _INO)),
    ("mknod", CFUNCTYPE(None, _REQ, _INO, c_char_p, c_mode_t, c_dev_t)),
    ("mkdir", CFUNCTYPE(None, _REQ, _INO, c_char_p, c_mode_t)),
    ("unlink", CFUNCTYPE(None, _REQ, _INO, c_char_p)),
    ("rmdir", CFUNCTYPE(None, _REQ, _INO, c_char_p)),
    ("symlink", CFUNCTYPE(None, _REQ, c_char_p, _INO, c_char_p)),
    ("rename", CFUNCTYPE(None, _REQ, _INO, c_char_p, _INO, c_char_p)),
    ("link", CFUNCTYPE(None, _REQ, _INO, _INO, c_char_p)),
    ("open", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("read", CFUNCTYPE(None, _REQ, _INO, c_size_t, c_off_t, _FI)),
    ("write", CFUNCTYPE(None, _REQ, _INO, c_void_p, c_size_t, c_off_t, _FI)),
    ("flush", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("release", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("fsync", CFUNCTYPE(None, _REQ, _INO, c_int, _FI)),
    ("opendir", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("readdir", CFUNCTYPE(None, _REQ, _INO, c_size_t, c_off_t, _FI)),
    ("releasedir", CFUNCTYPE(None, _REQ, _INO, _FI)),
    ("fsyncdir", CFUNCTYPE(None, _REQ, _INO, c_int, _FI)),
    ("statfs", CFUNCTYPE(None, _REQ, _INO)),
    ("setxattr", CFUNCTYPE(None, _REQ, _INO, c_char_p, c_void_p, c_size_t, c_int)),
    ("getxattr", CFUNCTYPE(None, _REQ, _INO, c_char_p, c_size_t)),
    ("listxattr", CFUNCTYPE(None, _REQ, _INO, c_size_t)),
    ("removexattr", CFUNCTYPE(None, _REQ, _INO, c_char_p)),
    ("access", CFUNCTYPE(None, _REQ, _INO, c_int)),
    ("create", CFUNCTYPE(None, _REQ, _INO, c_char_p, c_mode_t, _FI)),
    ("getlk", c_void_p),
    ("setlk", c_void_p),
    ("bmap", c_void_p),
    ("ioctl", c_void_p),
    ("poll", c_void_p),
    ("write_buf", CFUNCTYPE(None, _REQ, _INO, POINTER(fuse_bufvec), c_off_t, _FI)),
    ("retrieve_reply", c_void_p),
    ("forget_multi", c_void_p),
    ("flock", c_void_p),
    ("fallocate", c_void_p),
]


class fuse_lowlevel_ops(ctypes.Structure):
    _fields_ = OPS


def _proto(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


reply_err = _proto("fuse_reply_err", c_int, _REQ, c_int)
reply_none = _proto("fuse_reply_none", None, _REQ)
reply_entry = _proto("fuse_reply_entry", c_int, _REQ, POINTER(fuse_entry_param))
reply_create = _proto("fuse_reply_create", c_int, _REQ, POINTER(fuse_entry_param), _FI)
reply_attr = _proto("fuse_reply_attr", c_int, _REQ, POINTER(c_stat), c_double)
reply_readlink = _proto("fuse_reply_readlink", c_int, _REQ, c_char_p)
reply_open = _proto("fuse_reply_open", c_int, _REQ, _FI)
reply_write = _proto("fuse_reply_write", c_int, _REQ, c_size_t)
reply_buf = _proto("fuse_reply_buf", c_int, _REQ, c_char_p, c_size_t)
reply_statfs = _proto("fuse_reply_statfs", c_int, _REQ, POINTER(c_statvfs))
reply_xattr = _proto("fuse_reply_xattr", c_int, _REQ, c_size_t)
reply_data = _proto("fuse_reply_data", c_int, _REQ, POINTER(fuse_bufvec), c_int)
buf_copy = _proto("fuse_buf_copy", ctypes.c_ssize_t, POINTER(fuse_bufvec),
                  POINTER(fuse_bufvec), c_int)
buf_size = _proto("fuse_buf_size", c_size_t, POINTER(fuse_bufvec))
add_direntry = _proto("fuse_add_direntry", c_size_t, _REQ, c_void_p, c_size_t,
                      c_char_p, POINTER(c_stat), c_off_t)
req_ctx = _proto("fuse_req_ctx", POINTER(fuse_ctx), _REQ)

_mount = _proto("fuse_mount", c_void_p, c_char_p, POINTER(fuse_args))
_unmount = _proto("fuse_unmount", None, c_char_p, c_void_p)
_new = _proto("fuse_lowlevel_new", c_void_p, POINTER(fuse_args),
              POINTER(fuse_lowlevel_ops), c_size_t, c_void_p)
_add_chan = _proto("fuse_session_add_chan", None, c_void_p, c_void_p)
_remove_chan = _proto("fuse_session_remove_chan", None, c_void_p)
_set_signals = _proto("fuse_set_signal_handlers", c_int, c_void_p)
_remove_signals = _proto("fuse_remove_signal_handlers", None, c_void_p)
_loop_mt = _proto("fuse_session_loop_mt", c_int, c_void_p)
_loop = _proto("fuse_session_loop", c_int, c_void_p)
_destroy = _proto("fuse_session_destroy", None, c_void_p)
_free_args = _proto("fuse_opt_free_args", None, POINTER(fuse_args))
fuse_version = _proto("fuse_version", c_int)


class MountError(Exception):
    """libfuse refused the mount or the options (it printed why on stderr)."""


def run(handlers, mountpoint, options, threaded=True):
    """Mount ``mountpoint`` and serve requests until it is unmounted.

    ``handlers`` maps operation names of ``fuse_lowlevel_ops`` to Python
    callables with the C signature. ``options`` are libfuse ``-o`` options
    (mount and low-level ones only). Returns when the session ends (unmount
    or SIGINT/SIGTERM/SIGHUP, whose handlers libfuse installs).
    """
    ops = fuse_lowlevel_ops()
    keep = []                       # the C side holds these: keep them alive
    for name, proto in OPS:
        fn = handlers.get(name)
        if fn is not None:
            cfn = proto(fn)
            keep.append(cfn)
            setattr(ops, name, cfn)

    argv_list = [b"unionfs"]
    if options:
        argv_list += [b"-o", ",".join(options).encode()]
    argv = (c_char_p * len(argv_list))(*argv_list)
    args = fuse_args(len(argv_list), argv, 0)
    mnt = mountpoint.encode() if isinstance(mountpoint, str) else mountpoint

    chan = _mount(mnt, ctypes.byref(args))
    if not chan:
        _free_args(ctypes.byref(args))
        raise MountError("fuse_mount failed")
    session = _new(ctypes.byref(args), ctypes.byref(ops), ctypes.sizeof(ops), None)
    if not session:
        _unmount(mnt, chan)
        _free_args(ctypes.byref(args))
        raise MountError("fuse_lowlevel_new failed")
    try:
        if _set_signals(session) != 0:
            raise MountError("cannot install signal handlers")
        _add_chan(session, chan)
        try:
            rc = (_loop_mt if threaded else _loop)(session)
        finally:
            _remove_signals(session)
            _remove_chan(chan)
    finally:
        _destroy(session)
        _unmount(mnt, chan)
        _free_args(ctypes.byref(args))
    del keep
    return rc
