"""ctypes binding of libfuse 2.9's low-level API (the library fusepy loads).

libfuse 2.9 speaks FUSE protocol 7.19: no READDIRPLUS, no kernel-cached
directory listings, no rename flags, requests of at most 128 KiB. It is the
fallback where libfuse 3 is missing (``UNIONFS_LIBFUSE=2`` selects it).
"""

import ctypes
import os
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint, c_void_p

from unionfs.binding import common

common.point_fusepy_at_libfuse2()
import fuse as _fusepy  # noqa: E402  (after the path is set)

from unionfs.binding.common import MountError  # noqa: E402

lib = _fusepy._libfuse
fuse_file_info = _fusepy.fuse_file_info

# What this protocol lets the daemon ask for.
CACHE_READDIR = False   # FOPEN_CACHE_DIR

# fuse_conn_info.want / capable bits (libfuse 2.9)
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_BIG_WRITES = 1 << 5

# Options libfuse 2 needs to do what unionfs expects (measured: 128 KiB
# writes instead of 4 KiB; any directory can be covered, as with overlayfs).
DEFAULT_OPTIONS = {"big_writes": True, "max_write": "131072", "nonempty": True}


class fuse_conn_info(ctypes.Structure):
    _fields_ = [("proto_major", c_uint), ("proto_minor", c_uint),
                ("async_read", c_uint), ("max_write", c_uint),
                ("max_readahead", c_uint), ("capable", c_uint), ("want", c_uint),
                ("max_background", c_uint), ("congestion_threshold", c_uint),
                ("reserved", c_uint * 23)]


def configure(conn):
    """Called from init: what unionfs wants of the connection."""
    c = conn.contents
    c.want |= c.capable & (CAP_ATOMIC_O_TRUNC | CAP_BIG_WRITES)


OPS = common.lowlevel_ops(2, fuse_file_info, fuse_conn_info)

globals().update(common.bind_replies(lib, fuse_file_info))

_p = lambda *a: common.proto(lib, *a)   # noqa: E731
_s = common.bind_session(lib)
_mount = _p("fuse_mount", c_void_p, c_char_p, POINTER(common.fuse_args))
_unmount = _p("fuse_unmount", None, c_char_p, c_void_p)
_new = _p("fuse_lowlevel_new", c_void_p, POINTER(common.fuse_args), c_void_p,
          c_size_t, c_void_p)
_add_chan = _p("fuse_session_add_chan", None, c_void_p, c_void_p)
_remove_chan = _p("fuse_session_remove_chan", None, c_void_p)
_loop_mt = _p("fuse_session_loop_mt", c_int, c_void_p)
_chan = None            # the mounted channel, for notifications


def inval_inode(nodeid, attrs_only=False):
    """Make the kernel drop what it caches of ``nodeid``: its attributes,
    and unless ``attrs_only`` its pages. Never waits for a request, so it
    may be called while serving one."""
    if _chan:
        _s.notify_inval_inode(_chan, nodeid, -1 if attrs_only else 0, 0)


def run(handlers, mountpoint, options, threaded=False):
    """Mount ``mountpoint`` and serve requests until it is unmounted.

    ``handlers`` maps operation names of ``fuse_lowlevel_ops`` to Python
    callables with the C signature. ``options`` are libfuse ``-o`` options
    (mount and low-level ones only). Returns when the session ends (unmount
    or SIGINT/SIGTERM/SIGHUP, whose handlers libfuse installs).
    """
    global _chan
    ops, keep = common.build_ops(OPS, handlers)
    args = common.make_args(options)
    mnt = os.fsencode(mountpoint)

    chan = _mount(mnt, ctypes.byref(args))
    if not chan:
        _s.free_args(ctypes.byref(args))
        raise MountError("fuse_mount failed")
    session = _new(ctypes.byref(args), ctypes.byref(ops), ctypes.sizeof(ops), None)
    if not session:
        _unmount(mnt, chan)
        _s.free_args(ctypes.byref(args))
        raise MountError("fuse_lowlevel_new failed")
    try:
        if _s.set_signals(session) != 0:
            raise MountError("cannot install signal handlers")
        _add_chan(session, chan)
        _chan = chan
        try:
            rc = (_loop_mt if threaded else _s.loop)(session)
        finally:
            _chan = None
            _s.remove_signals(session)
            _remove_chan(chan)
    finally:
        _s.destroy(session)
        _unmount(mnt, chan)
        _s.free_args(ctypes.byref(args))
    del keep
    return rc


def library_version():
    v = _p("fuse_version", c_int)()
    return f"{v // 10}.{v % 10}"


NAME = "libfuse2"


def describe():
    """What ``fuse-unionfs --version`` says of this binding."""
    return [f"FUSE binding version {NAME}", f"FUSE library version {library_version()}"]
