"""The binding that speaks the kernel's FUSE protocol itself (DESIGN §9):
it reads requests from ``/dev/fuse`` and writes replies to it, with no
library in between.

It offers ``fs.py`` the same surface as the libfuse bindings (operations
with libfuse's low-level signatures, ``reply_*`` functions taking the same
structures), so the adapter stays the one place that knows the union. What
it adds is what the running kernel offers and libfuse 3.14 cannot ask for:

- passthrough of file I/O (``FUSE_PASSTHROUGH``, Linux 6.9+): reads, writes
  and mmap of an open regular file go from the kernel straight to the
  backing file (see ``Backing``);
- each request decoded with one precompiled ``struct`` layout into a buffer
  read once per thread, each reply written with one ``os.writev``;
- nothing to load at start-up but the standard library.

Requests are read by one thread (the default: quick requests are answered
inline, slow ones handed to ``fs.Workers``) or, with ``threaded=1``, by
several threads each reading its own clone of the device fd
(``FUSE_DEV_IOC_CLONE``).

Mounting: as root, ``mount(2)`` with ``fd=``; otherwise ``fusermount3``,
which mounts and hands the device fd back over a socket (``_FUSE_COMMFD``).
"""

import ctypes
import errno
import fcntl
import os
import stat
import sys
import threading
from functools import partial
from operator import itemgetter

from unionfs.binding import common
from unionfs.binding import fuseproto as P
from unionfs.binding.common import MountError
# Mounting is devmount's (the mount commands load it without this module).
from unionfs.binding.devmount import (  # noqa: F401 (the binding's surface)
    DEFAULT_OPTIONS, DROPPED_OPTIONS, PASSTHROUGH, _mount_as_root, _mount_with_fusermount,
    _open_device, _split, _unmount, can_mount_early, detach, mount_early)

CACHE_READDIR = True

MAX_PAGES = 256                         # 1 MiB requests (the kernel's limit)
MAX_WRITE = MAX_PAGES * 4096
BUFFER_SIZE = MAX_WRITE + 4096          # a WRITE's data and its headers
READERS = 4                             # reader threads with threaded=1

# What is asked of the kernel at INIT, if it offers it. As libfuse 3's
# defaults for this filesystem (see libfuse3.configure): readahead in the
# background, O_TRUNC in open, listings with attributes (and plain ones where
# the kernel judges them enough), pages dropped when a file's mtime or size
# changes behind them, directory operations in parallel, 1 MiB requests.
# Never WRITEBACK_CACHE (writes must reach the upper: crash guarantees).
# HANDLE_KILLPRIV_V2: the daemon removes set-id bits itself, by the kernel's
# whole rule (killpriv.py; the kernel's own FUSE fallback knows set-gid with
# group-exec only); the kernel marks the requests that must (writes,
# truncates and opens with O_TRUNC by a caller without CAP_FSETID, every
# chown), and still sends an empty SETATTR before a write it passes through.
# It also lets the kernel skip, on a file without set-id bits or
# security.capability, the getxattr("security.capability") it would
# otherwise send before every write(2) (SB_NOSEC): docs/PERFORMANCE.md.
# Beyond libfuse's defaults: symlink targets kept in the kernel's page cache
# (a symlink's target never changes under one node id: a new link is a new
# inode), so `ls -l` and path walks through links ask once; and POSIX ACLs
# handled by the kernel: it enforces them in its permission checks (as
# overlayfs does; without it a FUSE mount checks mode bits only) and caches
# them, so `ls -l` asks for system.posix_acl_access once per file, not on
# every listing. The upper's filesystem keeps ACL and mode in step (chmod,
# setting an ACL, inheriting a default ACL), as it does under overlayfs.
WANTED = (P.ASYNC_READ | P.ATOMIC_O_TRUNC | P.BIG_WRITES | P.AUTO_INVAL_DATA
          | P.DO_READDIRPLUS | P.READDIRPLUS_AUTO | P.ASYNC_DIO | P.PARALLEL_DIROPS
          | P.MAX_PAGES | P.HAS_IOCTL_DIR | P.INIT_EXT | P.CACHE_SYMLINKS | P.POSIX_ACL
          | P.HANDLE_KILLPRIV_V2)



# -- structures that cross into fs.py ------------------------------------------------

class fuse_file_info(ctypes.Structure):
    """libfuse 3's struct fuse_file_info, for code that builds one (fs.open,
    tests); requests themselves carry a plain ``FileInfo``."""
    _fields_ = [("flags", ctypes.c_int),
                ("writepage", ctypes.c_uint, 1), ("direct_io", ctypes.c_uint, 1),
                ("keep_cache", ctypes.c_uint, 1), ("flush", ctypes.c_uint, 1),
                ("nonseekable", ctypes.c_uint, 1), ("flock_release", ctypes.c_uint, 1),
                ("cache_readdir", ctypes.c_uint, 1), ("noflush", ctypes.c_uint, 1),
                ("padding", ctypes.c_uint, 24), ("padding2", ctypes.c_uint, 32),
                ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64),
                ("poll_events", ctypes.c_uint32)]


class FileInfo:
    """A request's file: what libfuse's ``fuse_file_info *`` gives (``contents``
    is the object itself, as a pointer's would be)."""
    __slots__ = ("flags", "fh", "direct_io", "keep_cache", "cache_readdir", "noflush",
                 "nonseekable", "kill_suidgid")

    def __init__(self, flags=0, fh=0, kill_suidgid=False):
        self.flags = flags
        self.fh = fh
        self.direct_io = self.keep_cache = self.cache_readdir = 0
        self.noflush = self.nonseekable = 0
        self.kill_suidgid = kill_suidgid    # a write or open that removes set-id bits

    @property
    def contents(self):
        return self


class Request:
    """One request's identity: where and under which ``unique`` to answer
    (``fd``: the device fd it was read from -- a clone's requests are
    answered on the clone), and who asked (``req_ctx``)."""
    __slots__ = ("session", "fd", "unique", "nodeid", "opcode", "uid", "gid", "pid")

    def __init__(self, session, fd, unique, nodeid, opcode, uid, gid, pid):
        self.session = session
        self.fd = fd
        self.unique = unique
        self.nodeid = nodeid
        self.opcode = opcode
        self.uid = uid
        self.gid = gid
        self.pid = pid

    @property
    def contents(self):         # req_ctx(req).contents.uid, as with libfuse
        return self


class _Timespec:
    __slots__ = ("tv_sec", "tv_nsec")

    def __init__(self, sec, nsec):
        self.tv_sec = sec
        self.tv_nsec = nsec


class _SetattrArgs:
    """The requested attributes of a SETATTR, named as libfuse's struct stat
    (``fs.SetAttr`` reads them); ``contents`` as a pointer's."""
    __slots__ = ("st_size", "st_mode", "st_uid", "st_gid", "st_atimespec", "st_mtimespec")

    @property
    def contents(self):
        return self


# -- reading fs.py's ctypes structures with one unpack each ---------------------------

def _stat_layout():
    """A Struct reading glibc's struct stat (``common.c_stat``) and a getter
    putting its fields in fuse_attr's order (all but the trailing flags)."""
    cs = common.c_stat
    types = dict(cs._fields_)
    tsec = types["st_atimespec"].tv_sec
    tnsec = types["st_atimespec"].tv_nsec
    # (name, offset, size) of each scalar we read
    want = [("ino", cs.st_ino.offset, cs.st_ino.size),
            ("size", cs.st_size.offset, cs.st_size.size),
            ("blocks", cs.st_blocks.offset, cs.st_blocks.size),
            ("atime", cs.st_atimespec.offset + tsec.offset, tsec.size),
            ("mtime", cs.st_mtimespec.offset + tsec.offset, tsec.size),
            ("ctime", cs.st_ctimespec.offset + tsec.offset, tsec.size),
            ("atimensec", cs.st_atimespec.offset + tnsec.offset, tnsec.size),
            ("mtimensec", cs.st_mtimespec.offset + tnsec.offset, tnsec.size),
            ("ctimensec", cs.st_ctimespec.offset + tnsec.offset, tnsec.size),
            ("mode", cs.st_mode.offset, cs.st_mode.size),
            ("nlink", cs.st_nlink.offset, cs.st_nlink.size),
            ("uid", cs.st_uid.offset, cs.st_uid.size),
            ("gid", cs.st_gid.offset, cs.st_gid.size),
            ("rdev", cs.st_rdev.offset, cs.st_rdev.size),
            ("blksize", cs.st_blksize.offset, cs.st_blksize.size)]
    # Times are signed, the rest unsigned (as fuse_attr has them).
    signed = {"atime", "mtime", "ctime"}
    by_offset = sorted(range(len(want)), key=lambda i: want[i][1])
    fmt, pos = "", 0
    for i in by_offset:
        name, off, size = want[i]
        code = {8: "q", 4: "i"}[size]
        fmt += "x" * (off - pos) + (code if name in signed else code.upper())
        pos = off + size
    fmt += "x" * (ctypes.sizeof(cs) - pos)
    order = [by_offset.index(i) for i in range(len(want))]
    return fmt, order


_STAT_FMT, _STAT_ORDER = _stat_layout()
_STAT = P.S("=" + _STAT_FMT)
_attr_order = itemgetter(*_STAT_ORDER)
_S_IFMT = stat.S_IFMT(0o177777)
_U32 = 0xFFFFFFFF
_NS = 1_000_000_000


def _fit(a):
    """fuse_attr's rdev and nlink are 32 bits (rdev as new_encode_dev)."""
    a = list(a)
    a[13] &= _U32
    a[10] = min(a[10], _U32)
    return a


def _attr(buf, off=0):
    """fuse_attr's fields (without flags) from a struct stat at ``off``."""
    a = _attr_order(_STAT.unpack_from(buf, off))
    return _fit(a) if a[13] > _U32 or a[10] > _U32 else a


def _stat_attr(st, ino, nlink, uid, gid):
    """fuse_attr's fields (without flags) of ``os.stat_result`` ``st``,
    showing ``ino``, ``nlink``, ``uid`` and ``gid``. (st[7:10] are the
    whole seconds, floored as the kernel's tv_sec.)"""
    a, m, c = st[7], st[8], st[9]
    return (ino, st.st_size, st.st_blocks, a, m, c, st.st_atime_ns - a * _NS,
            st.st_mtime_ns - m * _NS, st.st_ctime_ns - c * _NS, st.st_mode,
            nlink if nlink <= _U32 else _U32, uid, gid, st.st_rdev & _U32, st.st_blksize)


_timeouts = {}


def _split_timeout(t):
    """A cache lifetime in seconds as the kernel's (seconds, nanoseconds)."""
    got = _timeouts.get(t)
    if got is None:
        got = _timeouts[t] = _seconds_nanos(t)
    return got


def _seconds_nanos(t):
    if t <= 0:
        return 0, 0
    if t >= 2 ** 63:
        return 2 ** 64 - 1, 0
    sec = int(t)
    return sec, int((t - sec) * 1e9)


# -- replies (fs.py calls these with libfuse's arguments) -------------------------------

def _send(req, error, parts):
    """Write one reply; 0, or -errno as libfuse returns it (-ENOENT: the
    kernel no longer waits for this request -- it was interrupted)."""
    if req is None:
        return 0
    n = P.OUT_HEADER.size
    for p in parts:
        n += len(p)
    try:
        os.writev(req.fd, [P.OUT_HEADER.pack(n, error, req.unique), *parts])
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def reply_err(req, err):
    return _send(req, -err, ())


def reply_none(req):
    return 0


class Entry:
    """What answers a lookup: ``ino`` (the node id, as fuse_entry_param's),
    ``out`` (fuse_entry_out's bytes) and, for READDIRPLUS, the inode number
    and mode its directory entry shows. Made by ``entry``/``bare_entry``."""
    __slots__ = ("ino", "out", "attr_ino", "mode")

    def __init__(self, ino, out, attr_ino, mode):
        self.ino = ino
        self.out = out
        self.attr_ino = attr_ino
        self.mode = mode


_ZERO_ATTR = (0,) * 16
_ENTRY_PACK = P.ENTRY_OUT.pack
_GETXATTR_IN_UNPACK = P.GETXATTR_IN.unpack_from
_ATTR_PACK = P.ATTR_OUT.pack


def entry(nodeid, st, ino, nlink, uid, gid, attr_timeout, entry_timeout):
    """As ``common.entry``: node id ``nodeid`` with the attributes of
    ``os.stat_result`` ``st`` (``st`` None: no such name), encoded once."""
    es, ens = _timeouts.get(entry_timeout) or _split_timeout(entry_timeout)
    if st is None:          # a negative entry: only its lifetime matters
        return Entry(0, P.ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *_ZERO_ATTR), 0, 0)
    as_, ans = _timeouts.get(attr_timeout) or _split_timeout(attr_timeout)
    # _stat_attr, inlined: every LOOKUP and READDIRPLUS entry comes here.
    a, m, c = st[7], st[8], st[9]
    mode = st.st_mode
    out = _ENTRY_PACK(nodeid, 0, es, as_, ens, ans, ino, st.st_size, st.st_blocks, a, m, c,
                      st.st_atime_ns - a * _NS, st.st_mtime_ns - m * _NS,
                      st.st_ctime_ns - c * _NS, mode, nlink if nlink <= _U32 else _U32,
                      uid, gid, st.st_rdev & _U32, st.st_blksize, 0)
    return Entry(nodeid, out, ino, mode)


_BARE_OUT = P.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0, *_ZERO_ATTR)


def bare_entry(ino, mode):
    """As ``common.bare_entry``: a name's inode number and type only."""
    return Entry(0, _BARE_OUT, ino, mode)


def reply_entry(req, e):
    return _send(req, 0, (e.out,))


def _open_out(req, nodeid, f):
    """fuse_open_out's bytes for file ``f``, or None if the kernel could not
    take this open of ``nodeid`` as it stands (see Backing)."""
    flags = ((f.direct_io and P.FOPEN_DIRECT_IO) | (f.keep_cache and P.FOPEN_KEEP_CACHE)
             | (f.nonseekable and P.FOPEN_NONSEEKABLE)
             | (f.cache_readdir and P.FOPEN_CACHE_DIR) | (f.noflush and P.FOPEN_NOFLUSH))
    backing_id = 0
    if req is not None and req.opcode != P.OPENDIR:
        got = req.session.backing.open(nodeid, f.fh, flags, f.flags)
        if got is None:
            return None
        flags, backing_id = got
    return P.OPEN_OUT.pack(f.fh, flags, backing_id)


def reply_create(req, e, fi):
    """Answer a CREATE; -ESTALE (nothing sent) if the kernel could not take
    the open (see Backing), else as the other replies."""
    f = getattr(fi, "contents", fi)
    out = _open_out(req, e.ino, f)
    if out is None:
        return -errno.ESTALE
    sent = _send(req, 0, (e.out, out))
    if sent and req is not None:
        req.session.backing.release(f.fh)
    return sent


def reply_open(req, fi):
    """Answer an OPEN or OPENDIR; -ESTALE as reply_create."""
    f = getattr(fi, "contents", fi)
    out = _open_out(req, req.nodeid if req is not None else 0, f)
    if out is None:
        return -errno.ESTALE
    sent = _send(req, 0, (out,))
    if sent and req is not None and req.opcode != P.OPENDIR:
        req.session.backing.release(f.fh)
    return sent


def reply_attr(req, cst, timeout):
    s, ns = _split_timeout(timeout)
    return _send(req, 0, (P.ATTR_OUT.pack(s, ns, 0, *_attr(cst), 0),))


def reply_stat(req, st, ino, nlink, uid, gid, timeout):
    """As reply_attr, from an ``os.stat_result`` (no struct stat between)."""
    s, ns = _timeouts.get(timeout) or _split_timeout(timeout)
    a, m, c = st[7], st[8], st[9]       # _stat_attr, inlined: every GETATTR
    return _send(req, 0, (_ATTR_PACK(s, ns, 0, ino, st.st_size, st.st_blocks, a, m, c,
                                     st.st_atime_ns - a * _NS, st.st_mtime_ns - m * _NS,
                                     st.st_ctime_ns - c * _NS, st.st_mode,
                                     nlink if nlink <= _U32 else _U32, uid, gid,
                                     st.st_rdev & _U32, st.st_blksize, 0),))


def reply_readlink(req, target):
    return _send(req, 0, (target,))


def reply_write(req, n):
    return _send(req, 0, (P.WRITE_OUT.pack(n, 0),))


def reply_buf(req, buf, size):
    return _send(req, 0, (memoryview(buf)[:size],))


def reply_xattr(req, size):
    return _send(req, 0, (P.GETXATTR_OUT.pack(size, 0),))


def reply_statfs(req, sv):
    return _send(req, 0, (P.STATFS_OUT.pack(
        sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
        sv.f_bsize, sv.f_namemax, sv.f_frsize),))


_local = threading.local()


def _scratch(size):
    """This thread's buffer for file data on its way to the kernel."""
    mv = getattr(_local, "data", None)
    if mv is None or len(mv) < size:
        mv = _local.data = memoryview(bytearray(max(size, BUFFER_SIZE)))
    return mv


def reply_data(req, bufv, flags):
    """Answer a READ with ``bufv``'s data (one buffer: an fd and offset)."""
    b = bufv.buf[0]
    mv = _scratch(b.size)[:b.size]
    n = os.preadv(b.fd, [mv], b.pos)
    return _send(req, 0, (mv[:n],))


def buf_size(bufv):
    """The size of a WRITE's data (``bufv``: a memoryview of it)."""
    return len(bufv)


def buf_copy(dst, src, flags):
    """Write WRITE data ``src`` (a memoryview) into ``dst``'s fd at its
    offset; the bytes written or -errno, as fuse_buf_copy."""
    b = dst.buf[0]
    done = 0
    try:
        while done < len(src):
            n = os.pwrite(b.fd, src[done:], b.pos + done)
            if n == 0:
                break
            done += n
    except OSError as e:
        if done == 0:
            return -(e.errno or errno.EIO)
    return done


def req_ctx(req):
    return req


def direntplus_size(name):
    return P.direntplus_size(len(name))


def add_direntry(req, addr, room, name, st, off):
    """Write one READDIR entry at address ``addr`` if it fits in ``room``;
    returns its size either way (as fuse_add_direntry)."""
    size = P.direntry_size(len(name))
    if size <= room:
        head = P.DIRENT.pack(st.st_ino, off, len(name), (st.st_mode & _S_IFMT) >> 12)
        data = head + name
        ctypes.memmove(addr, data, len(data))
        ctypes.memset(addr + len(data), 0, size - len(data))
    return size


def add_direntry_plus(req, addr, room, name, e, off):
    """Write one READDIRPLUS entry (``e``: an Entry) at ``addr``."""
    size = P.direntplus_size(len(name))
    if size <= room:
        data = e.out + P.DIRENT.pack(e.attr_ino, off, len(name), (e.mode & _S_IFMT) >> 12) + name
        ctypes.memmove(addr, data, len(data))
        ctypes.memset(addr + len(data), 0, size - len(data))
    return size


def configure(conn):
    """fs.init's hook into INIT: the negotiation is done here already."""


# -- notifications -----------------------------------------------------------------------

_session = None         # the running session, for notifications


def inval_inode(nodeid, attrs_only=False):
    """Make the kernel drop what it caches of ``nodeid``: its attributes,
    and unless ``attrs_only`` its pages (for a directory, its cached
    listing). May be called while serving a request."""
    s = _session
    if s is not None:
        s.notify(P.NOTIFY_INVAL_INODE,
                 (P.NOTIFY_INVAL_INODE_OUT.pack(nodeid, -1 if attrs_only else 0, 0),))


def inval_entry(parent, name):
    """Make the kernel forget its entry ``name`` (bytes) in ``parent``."""
    s = _session
    if s is not None:
        s.notify(P.NOTIFY_INVAL_ENTRY,
                 (P.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0), name, b"\0"))


# -- passthrough -----------------------------------------------------------------------------

class Backing:
    """Which open files the kernel reads and writes itself (passthrough).

    The kernel holds one backing file per inode at a time: every open of an
    inode open for passthrough must name the same backing file (it refuses a
    daemon-served open then too), and an inode with daemon-served opens
    takes no passthrough open until they are closed. So each inode is in one
    mode while it has opens -- passthrough to one backing file, or served
    here -- and new opens follow it. One open cannot: a write-open of an
    inode whose lower file is passed through (the open copied it up), or
    one whose backing file lacks the access it needs (an earlier open was
    read-only, or write-only). ``open`` returns None for
    it, and fs.py gives the path a new node id and answers ESTALE: the
    kernel looks the name up again and opens a new inode, on the upper file
    (opens made before keep reading what they opened, as before copy-up
    with this daemon always did).

    A backing id is registered with the first passthrough open of an inode
    and closed with its last release. Passthrough needs CAP_SYS_ADMIN in the
    initial user namespace; without it (or on a kernel without it) every
    file is served by the daemon.
    """

    # The open flags the kernel allows with FOPEN_PASSTHROUGH.
    _PASSTHROUGH_FLAGS = P.FOPEN_PASSTHROUGH | P.FOPEN_DIRECT_IO | P.FOPEN_NOFLUSH
    # Backing files may be on a filesystem stacked once (overlayfs); a
    # unionfs mount so configured cannot itself be stacked upon by one more.
    STACK_DEPTH = 1

    def __init__(self, session, allowed):
        self.session = session
        self.allowed = allowed          # -o passthrough=on and the privilege for it
        self.enabled = False            # negotiated at INIT
        self._lock = threading.Lock()
        self._inodes = {}               # nodeid -> _Shared, while it has opens
        self._files = {}                # fh -> nodeid of each open counted there

    def negotiate(self, offered):
        """The INIT bits to ask for, and max_stack_depth."""
        self.enabled = self.allowed and bool(offered & P.PASSTHROUGH)
        return (P.PASSTHROUGH, self.STACK_DEPTH) if self.enabled else (0, 0)

    def open(self, nodeid, fd, flags, file_flags):
        """The (open_flags, backing_id) to answer an open of ``nodeid`` with
        (daemon fd ``fd``, opened with the request's ``file_flags``: its
        access mode and O_APPEND/O_SYNC/O_DSYNC), or None if the kernel
        could not take it (see the class doc)."""
        if not self.enabled:
            return flags, 0
        access = file_flags & os.O_ACCMODE
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return flags, 0
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            shared = self._inodes.get(nodeid)
            if shared is None:
                shared = self._inodes[nodeid] = self._start(fd, ident, access,
                                                            file_flags & self._PRIVATE_FLAGS)
            elif shared.backing_id is not None and (
                    shared.ident != ident
                    or (access != os.O_WRONLY and not shared.readable)
                    or (access != os.O_RDONLY and not shared.writable)):
                return None
            shared.opens += 1
            self._files[fd] = nodeid
        if shared.backing_id is None:
            return flags, 0
        return (flags & self._PASSTHROUGH_FLAGS) | P.FOPEN_PASSTHROUGH, shared.backing_id

    # File flags that would change every sharer's I/O: the kernel writes
    # through the backing file with its own flags.
    _PRIVATE_FLAGS = os.O_APPEND | os.O_SYNC | os.O_DSYNC

    def _start(self, fd, ident, access, private):
        """The mode of an inode's first open: passthrough to ``fd``'s file if
        the kernel takes it. Later opens share that file, so one opened with
        O_APPEND or O_SYNC (``private``: the fd has them, as the request
        asked) is opened anew without them."""
        shared = _Shared(ident, access != os.O_WRONLY, access != os.O_RDONLY)
        if not self.enabled:
            return shared
        backing = fd
        if private:
            backing = os.open(f"/proc/self/fd/{fd}", access | os.O_CLOEXEC)
        try:
            # A mutable buffer makes ioctl return the call's result: the id.
            shared.backing_id = fcntl.ioctl(self.session.fd, P.DEV_IOC_BACKING_OPEN,
                                            bytearray(P.BACKING_MAP.pack(backing, 0, 0)), True)
        except OSError as e:
            if e.errno == errno.EPERM:
                self.enabled = False        # not privileged: never again
        finally:
            if backing != fd:
                os.close(backing)
        return shared

    def release(self, fh):
        """The kernel released open ``fh`` (or never got it)."""
        with self._lock:
            nodeid = self._files.pop(fh, None)
            if nodeid is None:
                return
            shared = self._inodes[nodeid]
            shared.opens -= 1
            if shared.opens:
                return
            del self._inodes[nodeid]
        if shared.backing_id is not None:
            try:
                fcntl.ioctl(self.session.fd, P.DEV_IOC_BACKING_CLOSE,
                            P.S("=I").pack(shared.backing_id))
            except OSError:
                pass            # the connection is gone, and the id with it


class _Shared:
    """An inode with opens: passthrough to ``backing_id`` (a file with
    ``ident`` = (st_dev, st_ino), ``readable`` and ``writable`` or not), or
    served by the daemon (``backing_id`` None)."""
    __slots__ = ("ident", "readable", "writable", "backing_id", "opens")

    def __init__(self, ident, readable, writable):
        self.ident = ident
        self.readable = readable
        self.writable = writable
        self.backing_id = None
        self.opens = 0


# -- the session ----------------------------------------------------------------------------

class Session:
    """One mounted connection: its device fds, the operations, the loop."""

    def __init__(self, handlers, debug=False, passthrough=True):
        self.handlers = handlers
        self.debug = debug
        self.fd = -1
        self.proto_minor = 0
        self.conn = {}                  # connection options from -o (max_write=...)
        self.done = threading.Event()
        self.unmounted = False          # the kernel ended the connection
        self.error = None
        self.backing = Backing(self, passthrough and _may_pass_through())
        self._table = self._dispatch_table()

    # Notifications are written like replies (unique 0, the code in error).
    def notify(self, code, parts):
        n = P.OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [P.OUT_HEADER.pack(n, code, 0), *parts])
        except OSError:
            pass        # nothing cached, or the connection is gone: nothing to drop

    # -- the loop --

    def serve(self, fd):
        """Read and answer requests on ``fd`` until the connection ends."""
        buf = bytearray(BUFFER_SIZE)
        mv = memoryview(buf)
        iov = [buf]
        readv = os.readv
        unpack_header = P.IN_HEADER.unpack_from
        table = self._table
        session = self
        debug = self.debug
        while True:
            try:
                n = readv(fd, iov)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue            # ENOENT: a request interrupted before we read it
                if e.errno == errno.ENODEV:
                    self.unmounted = True
                else:
                    self.error = e
                self.done.set()
                return
            if n < P.IN_HEADER.size:
                if n == 0:      # /dev/fuse never reads empty: fd is no longer the device
                    self.error = OSError(errno.EBADF, "the FUSE device's descriptor was replaced")
                    self.done.set()
                    return
                continue
            _, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack_header(buf)
            req = Request(session, fd, unique, nodeid, opcode, uid, gid, pid)
            if debug:
                print(f"unionfs: {P.OPCODE_NAMES.get(opcode, opcode)} unique={unique} "
                      f"nodeid={nodeid} len={n}", file=sys.stderr, flush=True)
            handle = table.get(opcode)
            if handle is None:
                reply_err(req, errno.ENOSYS)
                continue
            try:
                handle(req, nodeid, buf, mv, n)
            except Exception as e:          # a malformed request or a bug here
                print(f"unionfs: request {opcode} failed: {e!r}", file=sys.stderr)
                if opcode not in (P.FORGET, P.BATCH_FORGET, P.INTERRUPT):
                    reply_err(req, errno.EIO)
            if opcode == P.DESTROY:
                self.done.set()
                return

    # -- decoding: one method per opcode, each calls the fs.py operation ----------

    def _dispatch_table(self):
        h = self.handlers
        t = {P.INIT: self._init, P.FORGET: self._forget, P.BATCH_FORGET: self._batch_forget,
             P.INTERRUPT: self._interrupt, P.DESTROY: self._destroy}
        decoders = {
            P.LOOKUP: ("lookup", self._name),
            P.GETATTR: ("getattr", self._getattr),
            P.SETATTR: ("setattr", self._setattr),
            P.READLINK: ("readlink", self._plain),
            P.SYMLINK: ("symlink", self._symlink),
            P.MKNOD: ("mknod", self._mknod),
            P.MKDIR: ("mkdir", self._mkdir),
            P.UNLINK: ("unlink", self._name),
            P.RMDIR: ("rmdir", self._name),
            P.RENAME: ("rename", self._rename),
            P.RENAME2: ("rename", self._rename2),
            P.LINK: ("link", self._link),
            P.OPEN: ("open", self._open),
            P.READ: ("read", self._read),
            P.WRITE: ("write_buf", self._write),
            P.STATFS: ("statfs", self._plain),
            P.RELEASE: ("release", self._release),
            P.FSYNC: ("fsync", self._fsync),
            P.SETXATTR: ("setxattr", self._setxattr),
            P.GETXATTR: ("getxattr", self._getxattr),
            P.LISTXATTR: ("listxattr", self._size),
            P.REMOVEXATTR: ("removexattr", self._name),
            P.OPENDIR: ("opendir", self._open),
            P.READDIR: ("readdir", self._read),
            P.READDIRPLUS: ("readdirplus", self._read),
            P.RELEASEDIR: ("releasedir", self._release),
            P.FSYNCDIR: ("fsyncdir", self._fsync),
            P.ACCESS: ("access", self._size),
            P.CREATE: ("create", self._create),
        }
        for opcode, (name, decode) in decoders.items():
            op = h.get(name)
            if op is not None:
                t[opcode] = self._bind(decode, op)
        return t

    @staticmethod
    def _bind(decode, op):
        return partial(decode, op)          # handle(req, nodeid, buf, mv, n)

    _H = P.IN_HEADER.size
    assert _H == 40 and P.GETXATTR_IN.size == 8     # as the inlined offsets say

    @staticmethod
    def _cstr(buf, start, end):
        """The NUL-terminated name at ``start`` and the offset after it."""
        z = buf.find(0, start, end)
        if z < 0:
            z = end
        return bytes(buf[start:z]), z + 1

    def _plain(self, op, req, nodeid, buf, mv, n):
        op(req, nodeid)

    def _name(self, op, req, nodeid, buf, mv, n):
        z = buf.find(0, 40, n)          # _cstr, inlined (40: the header's size)
        op(req, nodeid, bytes(buf[40:z if z >= 0 else n]))

    def _size(self, op, req, nodeid, buf, mv, n):     # listxattr's size, access's mask
        op(req, nodeid, P.ACCESS_IN.unpack_from(buf, self._H)[0])

    def _getattr(self, op, req, nodeid, buf, mv, n):
        op(req, nodeid, None)

    def _setattr(self, op, req, nodeid, buf, mv, n):
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _,
         uid, gid, _) = P.SETATTR_IN.unpack_from(buf, self._H)
        a = _SetattrArgs()
        a.st_size, a.st_mode, a.st_uid, a.st_gid = size, mode, uid, gid
        a.st_atimespec = _Timespec(atime, atimensec)
        a.st_mtimespec = _Timespec(mtime, mtimensec)
        to_set = valid & (P.FATTR_MODE | P.FATTR_UID | P.FATTR_GID | P.FATTR_SIZE
                          | P.FATTR_ATIME | P.FATTR_MTIME | P.FATTR_ATIME_NOW
                          | P.FATTR_MTIME_NOW | P.FATTR_CTIME | P.FATTR_KILL_SUIDGID)
        op(req, nodeid, a, to_set, FileInfo(0, fh) if valid & P.FATTR_FH else None)

    def _symlink(self, op, req, nodeid, buf, mv, n):
        name, at = self._cstr(buf, self._H, n)
        target, _ = self._cstr(buf, at, n)
        op(req, target, nodeid, name)

    def _mknod(self, op, req, nodeid, buf, mv, n):
        mode, rdev, _, _ = P.MKNOD_IN.unpack_from(buf, self._H)
        op(req, nodeid, self._cstr(buf, self._H + P.MKNOD_IN.size, n)[0], mode, rdev)

    def _mkdir(self, op, req, nodeid, buf, mv, n):
        mode, _ = P.MKDIR_IN.unpack_from(buf, self._H)
        op(req, nodeid, self._cstr(buf, self._H + P.MKDIR_IN.size, n)[0], mode)

    def _rename(self, op, req, nodeid, buf, mv, n):
        newdir, = P.RENAME_IN.unpack_from(buf, self._H)
        old, at = self._cstr(buf, self._H + P.RENAME_IN.size, n)
        op(req, nodeid, old, newdir, self._cstr(buf, at, n)[0], 0)

    def _rename2(self, op, req, nodeid, buf, mv, n):
        newdir, flags, _ = P.RENAME2_IN.unpack_from(buf, self._H)
        old, at = self._cstr(buf, self._H + P.RENAME2_IN.size, n)
        op(req, nodeid, old, newdir, self._cstr(buf, at, n)[0], flags)

    def _link(self, op, req, nodeid, buf, mv, n):
        old, = P.LINK_IN.unpack_from(buf, self._H)
        op(req, old, nodeid, self._cstr(buf, self._H + P.LINK_IN.size, n)[0])

    def _open(self, op, req, nodeid, buf, mv, n):
        flags, open_flags = P.OPEN_IN.unpack_from(buf, self._H)
        op(req, nodeid, FileInfo(flags, 0, bool(open_flags & P.OPEN_KILL_SUIDGID)))

    def _create(self, op, req, nodeid, buf, mv, n):
        flags, mode, _, _ = P.CREATE_IN.unpack_from(buf, self._H)
        name = self._cstr(buf, self._H + P.CREATE_IN.size, n)[0]
        op(req, nodeid, name, mode, FileInfo(flags))

    def _read(self, op, req, nodeid, buf, mv, n):
        fh, off, size, _, _, flags, _ = P.READ_IN.unpack_from(buf, self._H)
        op(req, nodeid, size, off, FileInfo(flags, fh))

    def _write(self, op, req, nodeid, buf, mv, n):
        fh, off, size, write_flags, _, flags, _ = P.WRITE_IN.unpack_from(buf, self._H)
        start = self._H + P.WRITE_IN.size
        op(req, nodeid, mv[start:start + size], off,
           FileInfo(flags, fh, bool(write_flags & P.WRITE_KILL_SUIDGID)))

    def _release(self, op, req, nodeid, buf, mv, n):
        fh, flags, _, _ = P.RELEASE_IN.unpack_from(buf, self._H)
        if req.opcode == P.RELEASE:
            self.backing.release(fh)
        op(req, nodeid, FileInfo(flags, fh))

    def _fsync(self, op, req, nodeid, buf, mv, n):
        fh, fsync_flags, _ = P.FSYNC_IN.unpack_from(buf, self._H)
        op(req, nodeid, fsync_flags & P.FSYNC_FDATASYNC, FileInfo(0, fh))

    def _setxattr(self, op, req, nodeid, buf, mv, n):
        size, flags = P.SETXATTR_IN.unpack_from(buf, self._H)
        name, at = self._cstr(buf, self._H + P.SETXATTR_IN.size, n)
        op(req, nodeid, name, bytes(buf[at:at + size]), size, flags)

    def _getxattr(self, op, req, nodeid, buf, mv, n):
        size, _ = _GETXATTR_IN_UNPACK(buf, 40)
        z = buf.find(0, 48, n)          # the name after the header and GETXATTR_IN (_cstr)
        op(req, nodeid, bytes(buf[48:z if z >= 0 else n]), size)

    # -- requests the binding answers itself --

    def _forget(self, req, nodeid, buf, mv, n):
        self.handlers["forget"](req, nodeid, P.FORGET_IN.unpack_from(buf, self._H)[0])

    def _batch_forget(self, req, nodeid, buf, mv, n):
        count, _ = P.BATCH_FORGET_IN.unpack_from(buf, self._H)
        forget = self.handlers["forget"]
        at = self._H + P.BATCH_FORGET_IN.size
        for one_nodeid, nlookup in P.FORGET_ONE.iter_unpack(mv[at:at + count * P.FORGET_ONE.size]):
            forget(req, one_nodeid, nlookup)

    def _interrupt(self, req, nodeid, buf, mv, n):
        # No reply. The interrupted request is answered when done (every
        # operation here is bounded), and a reply to a request the kernel
        # gave up on fails with ENOENT, which fs.py accounts for. The kernel
        # only asks; it does not wait for an answer to INTERRUPT.
        pass

    def _destroy(self, req, nodeid, buf, mv, n):
        reply_err(req, 0)

    def _init(self, req, nodeid, buf, mv, n):
        major, minor, max_readahead, flags, flags2 = P.INIT_IN.unpack_from(buf, self._H)
        if major != P.KERNEL_VERSION:
            # The kernel retries with ours if it is newer; older majors are gone.
            _send(req, 0, (P.INIT_OUT.pack(P.KERNEL_VERSION, P.KERNEL_MINOR_VERSION,
                                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),))
            return
        offered = flags | (flags2 << 32 if flags & P.INIT_EXT else 0)
        self.proto_minor = min(minor, P.KERNEL_MINOR_VERSION)
        want = offered & self.wanted()
        passthrough, stack_depth = self.backing.negotiate(offered)
        want |= passthrough
        c = self.conn
        max_write = min(int(c.get("max_write", MAX_WRITE)), MAX_WRITE)
        max_readahead = min(int(c.get("max_readahead", max_readahead)), max_readahead)
        _send(req, 0, (P.INIT_OUT.pack(
            P.KERNEL_VERSION, self.proto_minor, max_readahead, want & 0xFFFFFFFF,
            int(c.get("max_background", 0)), int(c.get("congestion_threshold", 0)),
            max_write, 1, MAX_PAGES, 0, want >> 32, stack_depth, 0),))
        init = self.handlers.get("init")
        if init is not None:
            init(None, None)

    def wanted(self):
        want = WANTED
        if self.conn.get("sync_read"):
            want &= ~P.ASYNC_READ
        return want


def _may_pass_through():
    """Registering backing files takes CAP_SYS_ADMIN in the initial user
    namespace: root outside any user namespace (checked here, so that a
    mount that cannot use passthrough does not ask for it)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


# -- mounting -----------------------------------------------------------------------------

def _clone(fd):
    """A new device fd reading the same connection (FUSE_DEV_IOC_CLONE)."""
    new = _open_device()
    try:
        fcntl.ioctl(new, P.DEV_IOC_CLONE, bytearray(P.S("=I").pack(fd)), True)
    except OSError:
        os.close(new)
        return None
    return new


def run(handlers, mountpoint, options, threaded=False, fd=None):
    """Mount ``mountpoint`` (unless ``fd`` is the device fd of a mount
    ``mount_early`` made) and serve requests until it is unmounted (or
    SIGINT/SIGTERM/SIGHUP, after which the mount is detached)."""
    global _session
    import _signal as signal    # the C module: signal.py loads enum (~1-2 ms), for nothing here
    debug = "debug" in options
    flags, kernel, fusermount, conn, fsname, subtype, names = _split(options)
    session = Session(handlers, debug=debug, passthrough=conn.pop("passthrough", "on") != "off")
    session.conn = conn
    as_root = os.geteuid() == 0 and not fusermount
    helper = None
    if fd is None and as_root:
        fd = _mount_as_root(mountpoint, flags, kernel, fsname, subtype)
    elif fd is None:
        fd, helper = _mount_with_fusermount(mountpoint, names, kernel, fusermount,
                                            fsname, subtype)
    session.fd = fd
    _session = session
    fds = [fd]
    stop = session.done
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        readers = [threading.Thread(target=session.serve, args=(fd,), name="unionfs-reader-0",
                                    daemon=True)]
        if threaded:
            for i in range(1, READERS):
                clone = _clone(fd)
                if clone is None:
                    break
                fds.append(clone)
                readers.append(threading.Thread(target=session.serve, args=(clone,),
                                                name=f"unionfs-reader-{i}", daemon=True))
        for t in readers:
            t.start()
        while not stop.wait(3600):
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _session = None
        if not session.unmounted:
            _unmount(mountpoint, as_root)
        if helper is not None:
            helper[1].close()
            helper[0].wait()
    if session.error is not None:
        raise MountError(f"reading /dev/fuse: {session.error.strerror}")
    return 0


NAME = "devfuse"


def describe():
    """What ``fuse-unionfs --version`` says of this binding."""
    return [f"FUSE binding version {NAME}",
            f"using FUSE kernel interface version {P.KERNEL_VERSION}.{P.KERNEL_MINOR_VERSION}"]
