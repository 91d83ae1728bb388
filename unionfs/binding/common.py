"""What the bindings share: glibc's ``struct stat`` and ``struct statvfs``
(the structures fs.py fills), and for libfuse 2.9's and libfuse 3's
low-level APIs their common structures, constants and reply functions,
bound through ctypes.

The glibc layouts are spelled out here for x86_64 and aarch64 (as fusepy
names them), so that a daemon on the /dev/fuse binding never loads fusepy or
libfuse; other machines take fusepy's.
"""

import ctypes
import os
import types
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_double, c_int, c_long, c_size_t,
                    c_uint, c_uint64, c_ulong, c_void_p)

from unionfs.binding import MountError  # noqa: F401 (the bindings', raised as common.MountError)


def point_fusepy_at_libfuse2():
    """fusepy finds libfuse 2 with ctypes.util.find_library, which runs
    `ldconfig -p`: milliseconds on every mount. Its FUSE_LIBRARY_PATH
    knob skips that when the library loads by its soname. Call before
    importing fusepy."""
    if "FUSE_LIBRARY_PATH" not in os.environ:
        try:
            ctypes.CDLL("libfuse.so.2")
        except OSError:
            return          # let fusepy search (and say so if it fails)
        os.environ["FUSE_LIBRARY_PATH"] = "libfuse.so.2"


c_off_t = c_long
c_mode_t = c_uint
c_dev_t = c_ulong
c_uid_t = c_uint
c_gid_t = c_uint
c_pid_t = c_int


class c_timespec(ctypes.Structure):
    _fields_ = [("tv_sec", c_long), ("tv_nsec", c_long)]


_TIMES = [("st_atimespec", c_timespec), ("st_mtimespec", c_timespec),
          ("st_ctimespec", c_timespec)]
_STAT_FIELDS = {
    "x86_64": [("st_dev", c_dev_t), ("st_ino", c_ulong), ("st_nlink", c_ulong),
               ("st_mode", c_mode_t), ("st_uid", c_uid_t), ("st_gid", c_gid_t),
               ("__pad0", c_int), ("st_rdev", c_dev_t), ("st_size", c_off_t),
               ("st_blksize", c_long), ("st_blocks", c_long)] + _TIMES,
    "aarch64": [("st_dev", c_dev_t), ("st_ino", c_ulong), ("st_mode", c_mode_t),
                ("st_nlink", c_uint), ("st_uid", c_uid_t), ("st_gid", c_gid_t),
                ("st_rdev", c_dev_t), ("__pad1", c_ulong), ("st_size", c_off_t),
                ("st_blksize", c_int), ("__pad2", c_int), ("st_blocks", c_long)] + _TIMES,
}.get(os.uname().machine)

if _STAT_FIELDS is not None:
    class c_stat(ctypes.Structure):
        _fields_ = _STAT_FIELDS

    class c_statvfs(ctypes.Structure):
        _fields_ = [(name, c_ulong) for name in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
            "f_ffree", "f_favail", "f_fsid", "f_flag", "f_namemax")]
else:
    point_fusepy_at_libfuse2()
    import fuse as _fusepy  # noqa: E402

    c_stat = _fusepy.c_stat
    c_statvfs = _fusepy.c_statvfs
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
SET_ATTR_KILL_SUIDGID = 1 << 11   # remove set-id bits as the kernel would (see killpriv)


class fuse_args(ctypes.Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


def make_args(options):
    """libfuse's argv for ``-o`` ``options`` (a list of str) as a fuse_args;
    the array is kept on it."""
    argv_list = [b"unionfs"]
    if options:
        argv_list += [b"-o", ",".join(options).encode()]
    argv = (c_char_p * len(argv_list))(*argv_list)
    args = fuse_args(len(argv_list), argv, 0)
    args._keep = argv
    return args


# glibc's struct stat ends in reserved words that fusepy's c_stat leaves out.
# That is harmless where libfuse hands us a pointer, but fuse_entry_param
# embeds a struct stat by value: without the tail, libfuse would read the
# timeouts from the reserved words (as 0, disabling all kernel caching).
_STAT_SIZE = {"x86_64": 144, "aarch64": 128, "ppc64le": 144, "ppc64": 144}.get(
    os.uname().machine, ctypes.sizeof(c_stat))


class fuse_entry_param(ctypes.Structure):
    # generation: unsigned long in libfuse 2, uint64_t in 3 (the same on
    # the 64-bit machines unionfs runs on).
    _fields_ = [("ino", fuse_ino_t), ("generation", c_uint64), ("attr", c_stat),
                ("_stat_tail", ctypes.c_char * (_STAT_SIZE - ctypes.sizeof(c_stat))),
                ("attr_timeout", c_double), ("entry_timeout", c_double)]


def fill_c_stat(cst, st, ino, nlink, uid, gid):
    """Fill struct stat ``cst`` from ``os.stat_result`` ``st``, showing inode
    number ``ino``, link count ``nlink`` and owner ``uid``/``gid``."""
    cst.st_ino = ino
    cst.st_mode = st.st_mode
    cst.st_nlink = nlink
    cst.st_uid = uid
    cst.st_gid = gid
    cst.st_rdev = st.st_rdev
    cst.st_size = st.st_size
    cst.st_blksize = st.st_blksize
    cst.st_blocks = st.st_blocks
    cst.st_atimespec.tv_sec, cst.st_atimespec.tv_nsec = divmod(st.st_atime_ns, 1_000_000_000)
    cst.st_mtimespec.tv_sec, cst.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    cst.st_ctimespec.tv_sec, cst.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, 1_000_000_000)


def entry(nodeid, st, ino, nlink, uid, gid, attr_timeout, entry_timeout):
    """The entry to answer a lookup with (``reply_entry``, ``reply_create``,
    ``add_direntry_plus``): node id ``nodeid`` with the attributes of
    ``st`` shown as in ``fill_c_stat``; ``nodeid`` 0 and ``st`` None: no
    such name, for ``entry_timeout`` seconds. Its ``ino`` is the node id."""
    e = fuse_entry_param()
    e.ino = nodeid
    e.entry_timeout = entry_timeout
    if st is not None:
        fill_c_stat(e.attr, st, ino, nlink, uid, gid)
        e.attr_timeout = attr_timeout
    return e


def bare_entry(ino, mode):
    """A READDIRPLUS entry that gives only a name's inode number and type
    (no node id: the kernel looks the name up when it needs it)."""
    e = fuse_entry_param()
    e.attr.st_ino = ino
    e.attr.st_mode = mode
    return e


class fuse_ctx(ctypes.Structure):
    _fields_ = [("uid", c_uid_t), ("gid", c_gid_t), ("pid", c_pid_t),
                ("umask", c_mode_t)]


# struct fuse_buf / fuse_bufvec: data described by memory or by a file
# descriptor, so libfuse moves file data itself, in C.
BUF_IS_FD = 1 << 1
BUF_FD_SEEK = 1 << 2


class fuse_buf(ctypes.Structure):
    _fields_ = [("size", c_size_t), ("flags", c_int), ("mem", c_void_p),
                ("fd", c_int), ("pos", c_off_t)]


class fuse_bufvec(ctypes.Structure):
    _fields_ = [("count", c_size_t), ("idx", c_size_t), ("off", c_size_t),
                ("buf", fuse_buf * 1)]


def direntry_size(name):
    """The size of one READDIR entry: struct fuse_dirent (24 bytes up to
    the name) and the name, 8-byte aligned (FUSE_DIRENT_SIZE)."""
    return (24 + len(name) + 7) & ~7


def fd_bufvec(fd, size, pos):
    """A one-buffer vector for ``size`` bytes of ``fd`` at offset ``pos``."""
    v = fuse_bufvec(1, 0, 0)
    b = v.buf[0]
    b.size = size
    b.flags = BUF_IS_FD | BUF_FD_SEEK
    b.fd = fd
    b.pos = pos
    return v


def proto(lib, name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


def bind_replies(lib, fuse_file_info):
    """The reply and helper functions both libraries export, by name."""
    FI = POINTER(fuse_file_info)
    REQ = fuse_req_t
    p = lambda *a: proto(lib, *a)   # noqa: E731
    reply_attr = p("fuse_reply_attr", c_int, REQ, POINTER(c_stat), c_double)

    def reply_stat(req, st, ino, nlink, uid, gid, timeout):
        """Answer with the attributes of ``os.stat_result`` ``st`` (shown as
        in ``fill_c_stat``), cached for ``timeout`` seconds."""
        cst = c_stat()
        fill_c_stat(cst, st, ino, nlink, uid, gid)
        return reply_attr(req, cst, timeout)
    return dict(
        reply_stat=reply_stat, entry=entry, bare_entry=bare_entry,
        reply_err=p("fuse_reply_err", c_int, REQ, c_int),
        reply_none=p("fuse_reply_none", None, REQ),
        reply_entry=p("fuse_reply_entry", c_int, REQ, POINTER(fuse_entry_param)),
        reply_create=p("fuse_reply_create", c_int, REQ, POINTER(fuse_entry_param), FI),
        reply_attr=reply_attr,
        reply_readlink=p("fuse_reply_readlink", c_int, REQ, c_char_p),
        reply_open=p("fuse_reply_open", c_int, REQ, FI),
        reply_write=p("fuse_reply_write", c_int, REQ, c_size_t),
        reply_buf=p("fuse_reply_buf", c_int, REQ, c_char_p, c_size_t),
        reply_statfs=p("fuse_reply_statfs", c_int, REQ, POINTER(c_statvfs)),
        reply_xattr=p("fuse_reply_xattr", c_int, REQ, c_size_t),
        reply_data=p("fuse_reply_data", c_int, REQ, POINTER(fuse_bufvec), c_int),
        buf_copy=p("fuse_buf_copy", ctypes.c_ssize_t, POINTER(fuse_bufvec),
                   POINTER(fuse_bufvec), c_int),
        buf_size=p("fuse_buf_size", c_size_t, POINTER(fuse_bufvec)),
        add_direntry=p("fuse_add_direntry", c_size_t, REQ, c_void_p, c_size_t,
                       c_char_p, POINTER(c_stat), c_off_t),
        req_ctx=p("fuse_req_ctx", POINTER(fuse_ctx), REQ),
    )


def lowlevel_ops(version, fuse_file_info, fuse_conn_info):
    """The fields of ``struct fuse_lowlevel_ops`` for libfuse ``version`` (2
    or 3), in order. The operations unionfs does not implement are plain
    pointers, left NULL: libfuse answers ENOSYS (or does the sane default).

    libfuse 3 passes rename's flags, counts lookups in uint64_t, and appends
    readdirplus, copy_file_range and lseek (3.2-3.16 layout).
    """
    FI = POINTER(fuse_file_info)
    REQ, INO = fuse_req_t, fuse_ino_t

    def op(*args):
        return CFUNCTYPE(None, *args)

    rename_args = (REQ, INO, c_char_p, INO, c_char_p) + ((c_uint,) if version >= 3 else ())
    fields = [
        ("init", op(c_void_p, POINTER(fuse_conn_info))),
        ("destroy", op(c_void_p)),
        ("lookup", op(REQ, INO, c_char_p)),
        ("forget", op(REQ, INO, c_uint64 if version >= 3 else c_ulong)),
        ("getattr", op(REQ, INO, FI)),
        ("setattr", op(REQ, INO, POINTER(c_stat), c_int, FI)),
        ("readlink", op(REQ, INO)),
        ("mknod", op(REQ, INO, c_char_p, c_mode_t, c_dev_t)),
        ("mkdir", op(REQ, INO, c_char_p, c_mode_t)),
        ("unlink", op(REQ, INO, c_char_p)),
        ("rmdir", op(REQ, INO, c_char_p)),
        ("symlink", op(REQ, c_char_p, INO, c_char_p)),
        ("rename", op(*rename_args)),
        ("link", op(REQ, INO, INO, c_char_p)),
        ("open", op(REQ, INO, FI)),
        ("read", op(REQ, INO, c_size_t, c_off_t, FI)),
        ("write", op(REQ, INO, c_void_p, c_size_t, c_off_t, FI)),
        ("flush", op(REQ, INO, FI)),
        ("release", op(REQ, INO, FI)),
        ("fsync", op(REQ, INO, c_int, FI)),
        ("opendir", op(REQ, INO, FI)),
        ("readdir", op(REQ, INO, c_size_t, c_off_t, FI)),
        ("releasedir", op(REQ, INO, FI)),
        ("fsyncdir", op(REQ, INO, c_int, FI)),
        ("statfs", op(REQ, INO)),
        ("setxattr", op(REQ, INO, c_char_p, c_void_p, c_size_t, c_int)),
        ("getxattr", op(REQ, INO, c_char_p, c_size_t)),
        ("listxattr", op(REQ, INO, c_size_t)),
        ("removexattr", op(REQ, INO, c_char_p)),
        ("access", op(REQ, INO, c_int)),
        ("create", op(REQ, INO, c_char_p, c_mode_t, FI)),
        ("getlk", c_void_p),
        ("setlk", c_void_p),
        ("bmap", c_void_p),
        ("ioctl", c_void_p),
        ("poll", c_void_p),
        ("write_buf", op(REQ, INO, POINTER(fuse_bufvec), c_off_t, FI)),
        ("retrieve_reply", c_void_p),
        ("forget_multi", c_void_p),
        ("flock", c_void_p),
        ("fallocate", c_void_p),
    ]
    if version >= 3:
        fields += [
            ("readdirplus", op(REQ, INO, c_size_t, c_off_t, FI)),
            ("copy_file_range", c_void_p),
            ("lseek", c_void_p),
        ]
    return fields


def bind_session(lib):
    """The session calls whose signatures both libraries share (libfuse 2
    passes its channel where libfuse 3 passes the session: both pointers)."""
    p = lambda *a: proto(lib, *a)   # noqa: E731
    return types.SimpleNamespace(
        set_signals=p("fuse_set_signal_handlers", c_int, c_void_p),
        remove_signals=p("fuse_remove_signal_handlers", None, c_void_p),
        loop=p("fuse_session_loop", c_int, c_void_p),
        destroy=p("fuse_session_destroy", None, c_void_p),
        free_args=p("fuse_opt_free_args", None, POINTER(fuse_args)),
        notify_inval_inode=p("fuse_lowlevel_notify_inval_inode", c_int, c_void_p,
                             c_uint64, ctypes.c_int64, ctypes.c_int64),
    )


def build_ops(ops_fields, handlers):
    """A filled ``struct fuse_lowlevel_ops`` and the ctypes callbacks it
    points to (which the caller must keep alive while the session runs)."""

    class Ops(ctypes.Structure):
        _fields_ = ops_fields

    ops = Ops()
    keep = []
    for name, ftype in ops_fields:
        fn = handlers.get(name)
        if fn is not None and ftype is not c_void_p:
            cfn = ftype(fn)
            keep.append(cfn)
            setattr(ops, name, cfn)
    return ops, keep
