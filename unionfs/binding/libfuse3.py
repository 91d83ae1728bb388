"""ctypes binding of libfuse 3's low-level API (fuse_lowlevel.h, 3.2 or later).

libfuse 3 speaks the kernel's current FUSE protocol, which gives unionfs
what libfuse 2.9 (protocol 7.19) cannot ask for:

- READDIRPLUS: a listing carries each entry's attributes, so a cold
  ``find``/``ls -l`` needs no LOOKUP per name;
- FOPEN_CACHE_DIR: the kernel keeps directory listings between opens;
- requests of up to 1 MiB (max_pages) instead of 128 KiB;
- renameat2's flags reach the daemon (RENAME_NOREPLACE, RENAME_EXCHANGE).

The operations are the same Python callables as for libfuse 2 (``fs.py``);
only the structures, the capability bits and the session calls differ.
"""

import ctypes
import os
import ctypes.util
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint, c_uint32, c_uint64, c_void_p

from unionfs.binding import common
from unionfs.binding.common import MountError, c_off_t, fuse_entry_param, fuse_req_t


def _load():
    # The soname first: find_library runs `ldconfig -p`, which costs every
    # mount (and every container start) milliseconds.
    try:
        return ctypes.CDLL("libfuse3.so.3")
    except OSError:
        pass
    name = ctypes.util.find_library("fuse3")
    if name:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    raise OSError("libfuse3 not found (Debian/Ubuntu: apt install fuse3)")


lib = _load()

CACHE_READDIR = True

# fuse_conn_info.want / capable bits (fuse_common.h)
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_WRITEBACK_CACHE = 1 << 16
CAP_HANDLE_KILLPRIV = 1 << 20

# libfuse 3 makes the right choices by itself (large writes, any mount
# point); its option parser rejects these libfuse 2 options, so they are
# dropped: a user's fstab or a container engine may still pass them.
DEFAULT_OPTIONS = {}
DROPPED_OPTIONS = {"big_writes", "nonempty"}


class fuse_file_info(ctypes.Structure):
    _fields_ = [("flags", c_int),
                ("writepage", c_uint, 1), ("direct_io", c_uint, 1),
                ("keep_cache", c_uint, 1), ("flush", c_uint, 1),
                ("nonseekable", c_uint, 1), ("flock_release", c_uint, 1),
                ("cache_readdir", c_uint, 1), ("noflush", c_uint, 1),
                ("padding", c_uint, 24), ("padding2", c_uint, 32),
                ("fh", c_uint64), ("lock_owner", c_uint64), ("poll_events", c_uint32)]


class fuse_conn_info(ctypes.Structure):
    _fields_ = [("proto_major", c_uint), ("proto_minor", c_uint),
                ("max_write", c_uint), ("max_read", c_uint),
                ("max_readahead", c_uint), ("capable", c_uint), ("want", c_uint),
                ("max_background", c_uint), ("congestion_threshold", c_uint),
                ("time_gran", c_uint), ("reserved", c_uint * 22)]


_conn_opts = None       # what fuse_parse_conn_info_opts took from -o (max_write=...)
_session = None         # the running session, for notifications


def configure(conn):
    """Called from init: what unionfs wants of the connection."""
    c = conn.contents
    if _conn_opts:
        _apply_conn_opts(_conn_opts, conn)
    c.want |= c.capable & (CAP_ATOMIC_O_TRUNC | CAP_READDIRPLUS | CAP_READDIRPLUS_AUTO)
    # The daemon writes as root, which never clears set-uid/set-gid bits:
    # let the kernel send the setattr that clears them (as with libfuse 2).
    c.want &= ~CAP_HANDLE_KILLPRIV
    # Write-back caching would let the kernel keep writes and mtimes to
    # itself; unionfs's crash guarantees rest on writes reaching the upper.
    c.want &= ~CAP_WRITEBACK_CACHE


OPS = common.lowlevel_ops(3, fuse_file_info, fuse_conn_info)

globals().update(common.bind_replies(lib, fuse_file_info))

_p = lambda *a: common.proto(lib, *a)   # noqa: E731
_s = common.bind_session(lib)
add_direntry_plus = _p("fuse_add_direntry_plus", c_size_t, fuse_req_t, c_void_p, c_size_t,
                       c_char_p, POINTER(fuse_entry_param), c_off_t)


def direntplus_size(name):
    """The size of one READDIRPLUS entry: struct fuse_direntplus (152 bytes
    up to the name) and the name, 8-byte aligned (FUSE_DIRENTPLUS_SIZE)."""
    return (152 + len(name) + 7) & ~7


_parse_conn_opts = _p("fuse_parse_conn_info_opts", c_void_p, POINTER(common.fuse_args))
_apply_conn_opts = _p("fuse_apply_conn_info_opts", None, c_void_p, POINTER(fuse_conn_info))
_new = _p("fuse_session_new", c_void_p, POINTER(common.fuse_args), c_void_p,
          c_size_t, c_void_p)
_mount = _p("fuse_session_mount", c_int, c_void_p, c_char_p)
_unmount = _p("fuse_session_unmount", None, c_void_p)
_loop_mt = _p("fuse_session_loop_mt_31", c_int, c_void_p, c_int)
_free = common.proto(ctypes.CDLL(None), "free", None, c_void_p)


def inval_inode(nodeid, attrs_only=False):
    """Make the kernel drop what it caches of ``nodeid``: its attributes,
    and unless ``attrs_only`` its pages (for a directory, its cached
    listing). Never waits for a request, so it may be called while serving
    one."""
    if _session:
        _s.notify_inval_inode(_session, nodeid, -1 if attrs_only else 0, 0)


def run(handlers, mountpoint, options, threaded=False):
    """Mount ``mountpoint`` and serve requests until it is unmounted.

    ``handlers`` maps operation names of ``fuse_lowlevel_ops`` to Python
    callables with the C signature. ``options`` are libfuse ``-o`` options:
    mount options, session options and connection options (``max_write=``
    and the like, taken by ``fuse_parse_conn_info_opts`` and applied in
    init). Returns when the session ends (unmount or SIGINT/SIGTERM/SIGHUP,
    whose handlers libfuse installs).
    """
    global _conn_opts, _session
    ops, keep = common.build_ops(OPS, handlers)
    options = [o for o in options if o.partition("=")[0] not in DROPPED_OPTIONS]
    args = common.make_args(options)
    mnt = os.fsencode(mountpoint)

    try:
        _conn_opts = _parse_conn_opts(ctypes.byref(args))
        if not _conn_opts:
            raise MountError("bad connection options")
        session = _new(ctypes.byref(args), ctypes.byref(ops), ctypes.sizeof(ops), None)
        if not session:
            raise MountError("fuse_session_new failed")
        try:
            if _s.set_signals(session) != 0:
                raise MountError("cannot install signal handlers")
            try:
                if _mount(session, mnt) != 0:
                    raise MountError("fuse_session_mount failed")
                _session = session
                try:
                    rc = _loop_mt(session, 0) if threaded else _s.loop(session)
                finally:
                    _session = None
                    _unmount(session)
            finally:
                _s.remove_signals(session)
        finally:
            _s.destroy(session)
    finally:
        _s.free_args(ctypes.byref(args))
        if _conn_opts:
            _free(_conn_opts)
            _conn_opts = None
    del keep
    return rc


def library_version():
    return _p("fuse_pkgversion", c_char_p)().decode()


NAME = "libfuse3"


def describe():
    """What ``fuse-unionfs --version`` says of this binding."""
    return [f"FUSE binding version {NAME}", f"FUSE library version {library_version()}"]
