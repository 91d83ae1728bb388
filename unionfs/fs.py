"""The FUSE adapter: libfuse low-level requests onto ``Union`` operations.

A protocol adapter only. It keeps the inode table the kernel needs (node id
-> merged path), unpacks request arguments, calls the union with merged
paths, and replies. Errors are translated in one place, ``_dispatch``: an
``OSError`` becomes its errno; anything else is a bug, logged, and answered
with EIO so the daemon keeps serving.

Inodes. The kernel asks by node id; a node id names one *file*, not one
path: every path of a hard link in the upper maps to the same node id (found
through the backing inode number), so the kernel's attribute and page caches
stay coherent across names, as with overlayfs. Node ids are never reused, so
generation numbers are always 0.

Caching. The daemon is the only writer of the upper and lowers never change,
so whatever the kernel caches changes only through requests that pass here
and that the kernel itself accounts for. Entries and attributes are therefore
cached for ``timeout`` seconds (fuse-overlayfs does the same), and file pages
are kept across opens (``keep_cache``).
"""

import bisect
import ctypes
import errno
import fcntl
import os
import stat
import sys
import threading
import time
import zlib
from _queue import SimpleQueue     # queue.SimpleQueue, without queue's heapq et al.

from unionfs import binding, killpriv
from unionfs.binding import common
from unionfs.layers import child_path
from unionfs.osutil import RENAME_EXCHANGE, RENAME_NOREPLACE

ll = binding.load()

DEFAULT_TIMEOUT = 1_000_000.0   # seconds; as fuse-overlayfs's default
MAX_LISTED_ENTRIES = 16_384     # directory entries kept ready for readdir (see layers.py)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND

_S_IFDIR = stat.S_IFDIR
_FS_ENCODING = sys.getfilesystemencoding()     # os.fsdecode's, without its call
_FS_ERRORS = sys.getfilesystemencodeerrors()


class Inode:
    __slots__ = ("nodeid", "path", "nlookup", "is_dir", "ident", "fds", "ino", "alias",
                 "replaced")

    def __init__(self, nodeid, path, is_dir):
        self.nodeid = nodeid
        self.path = path            # a current merged path; None once unlinked
        self.nlookup = 0
        self.is_dir = is_dir
        self.ident = None           # (st_dev, st_ino) of an upper hard link
        self.fds = None             # its open fds (a list once opened), for fstat once unlinked
        self.ino = 0                # the st_ino it shows (fixed for life)
        self.alias = False          # another node id has the same file (see _copied_up)
        self.replaced = False       # its name has a new node (_join, _open_as_new_inode)


class UnionFS:
    """Serves a ``Union`` over FUSE (see the module doc)."""

    def __init__(self, union, timeout=DEFAULT_TIMEOUT, on_init=None, watch=None):
        self.union = union
        self.watch = watch      # an observe.Recorder timing every request, or None
        self.timeout = float(timeout)
        self.on_init = on_init
        # The reply to a lookup of a missing name: ino 0 is a "no such
        # entry" the kernel may cache. Read-only, so shared by all threads.
        self._negative = ll.entry(0, None, 0, 0, 0, 0, 0.0, self.timeout)
        root = Inode(common.ROOT_ID, "/", True)
        root.nlookup = 1
        # Plain entries (see _full) take the compact form: their path in
        # _inodes, their node id in _by_path.
        self._inodes = {common.ROOT_ID: root}  # node id -> Inode, or path
        self._by_path = {"/": root}        # merged path -> Inode, or node id
        self._by_ident = {}                # (dev, ino) of upper hard links -> Inode
        self._next_id = common.ROOT_ID + 1
        self._table = threading.Lock()     # guards the three maps above
        # Held while a descriptor of Inode.fds is closed or reopened by its
        # number (_reopen_unlinked): a number closed meanwhile could name
        # another file by the time it is reopened.
        self._fds_lock = threading.Lock()
        self._dirs = {}                    # dir handle -> Listing it reads, or None
        self._next_dh = 1
        self._listings = {}                # dir path -> (entries, Listing)
        self._listed = 0                   # entries held by the map above
        self._later = _Later()             # notifications sent after their request
        if union.copyup is not None:
            union.copyup.on_publish = self._copied_up

    # -- the inode table ----------------------------------------------------------
    #
    # The kernel holds a node id for every entry it has looked up and not yet
    # forgotten: after a `find` over 500k files, 500k of them. Most are
    # *plain*: a non-directory looked up once, never opened, not a known
    # upper hard link. Such an entry is kept in compact form -- its path as
    # the value in _inodes, its node id as the value in _by_path, ~170 bytes
    # instead of ~300 with an Inode -- and gets an Inode (_full) as soon as
    # there is more to remember. Code that needs only the path reads it
    # without making one (_path).

    def _inode(self, nodeid):
        inode = self._inodes.get(nodeid)
        if inode.__class__ is str:
            with self._table:
                inode = self._full(nodeid)
        if inode is None:
            raise OSError(errno.ESTALE, "stale node id")
        return inode

    def _full(self, nodeid):
        """The Inode of ``nodeid`` (None if unknown), made from its compact
        form if it has one. The caller holds the table lock."""
        inode = self._inodes.get(nodeid)
        if inode.__class__ is not str:
            return inode
        path = inode
        inode = Inode(nodeid, path, False)
        inode.nlookup = 1
        self._inodes[nodeid] = inode
        if self._by_path.get(path) == nodeid:
            self._by_path[path] = inode
        return inode

    def _full_at(self, path):
        """The Inode the table has at ``path`` (None if none), made full.
        The caller holds the table lock."""
        inode = self._by_path.get(path)
        return self._full(inode) if inode.__class__ is int else inode

    def _path_of(self, nodeid):
        """The current path of ``nodeid``; None if unlinked or unknown."""
        inode = self._inodes.get(nodeid)
        return inode if inode is None or inode.__class__ is str else inode.path

    def _path(self, nodeid):
        inode = self._inodes.get(nodeid)
        if inode.__class__ is str:
            return inode
        if inode is None:
            raise OSError(errno.ESTALE, "stale node id")
        if inode.path is None:
            raise OSError(errno.ENOENT, "unlinked")
        return inode.path

    def _remember(self, path, st, layer):
        """The node id for ``path`` (whose stat is ``st``), counted as looked
        up, and its Inode (None if it is kept in compact form)."""
        is_dir = stat.S_ISDIR(st.st_mode)
        linked = not is_dir and st.st_nlink > 1 and layer.upper
        with self._table:
            inode = self._full_at(path)
            if inode is not None and inode.is_dir != is_dir:
                inode = None
            if inode is None and linked:
                # Another name of an upper hard link we already know.
                ident = (st.st_dev, st.st_ino)
                inode = self._by_ident.get(ident)
                if inode is not None and inode.path is None:
                    inode = None
            if inode is None and not (is_dir or linked):
                nodeid = self._next_id
                self._next_id += 1
                self._inodes[nodeid] = path
                self._by_path[path] = nodeid
                return nodeid, None
            if inode is None:
                inode = Inode(self._next_id, path, is_dir)
                self._next_id += 1
                self._inodes[inode.nodeid] = inode
            if linked:
                self._claim_ident(inode, (st.st_dev, st.st_ino))
            self._by_path[path] = inode
            if inode.path is None:
                inode.path = path
            inode.nlookup += 1
            return inode.nodeid, inode

    def _forget_path(self, path, tree=False):
        """``path`` (and, for a directory, all below it) no longer exists."""
        with self._table:
            inode = self._full_at(path)
            self._by_path.pop(path, None)
            if inode is not None and inode.path == path:
                inode.path = self._other_name(inode, path)
            if tree:
                prefix = path + "/"
                for p in [p for p in self._by_path if p.startswith(prefix)]:
                    child = self._full_at(p)
                    del self._by_path[p]
                    if child.path == p:
                        child.path = self._other_name(child, p)

    def _other_name(self, inode, gone):
        """Another known path of hard link ``inode`` (None if none). Caller
        holds the table lock."""
        if inode.ident is None:
            return None
        for p, other in self._by_path.items():
            if other is inode and p != gone:
                return p
        return None

    def stats(self):
        """Figures for `unionfs stats`: the inodes the kernel holds (looked
        up and not yet forgotten)."""
        return {"kernel_inodes": len(self._inodes)}

    def _moved(self, old, new):
        """Rename in the table: ``old`` (and what is below it) is now ``new``."""
        with self._table:
            target = self._full_at(new)
            self._by_path.pop(new, None)
            if target is not None and target.path == new:
                target.path = self._other_name(target, new)
            inode = self._full_at(old)
            if inode is not None:
                self._repath(((old, new),), below=inode.is_dir)

    def _copied_up(self, path, linked=False):
        """``path`` was just copied up. Its inode number stays (inodes.py),
        but other attributes may not (st_blocks, st_ctime), and the kernel
        learns attributes only from replies, which a copy-up for an open or
        an xattr change does not send: drop its cached attributes.

        ``linked``: ``path`` is one name of a lower hard link, now one upper
        file with its other names (published one after the other). The
        first name the kernel knows keeps its node id, and the file is
        found by its upper inode from then on (``_by_ident``). Each other
        name the kernel knows under another node id is made to forget it
        (``_join``), so its next lookup finds that one node: one kernel
        inode per file, as on overlayfs. Without a way to tell the kernel
        (the libfuse bindings), such a name stays an *alias*: its attributes
        are not cached and its pages are dropped at every open, so a change
        through one name shows through the others (close-to-open, as NFS).

        Its cached pages may stay: a copy-up does not change the bytes (and
        dropping pages from inside a request could deadlock with a reader
        waiting on this loop)."""
        with self._table:
            inode = self._full_at(path)
        if linked and self._join(path, inode):
            return
        if inode is not None:
            inode.alias = inode.alias or linked
            ll.inval_inode(inode.nodeid, attrs_only=True)

    def _join(self, path, inode):
        """Make ``path``, a just published name of an upper hard link, one
        node with the others (see _copied_up); False if the kernel cannot be
        told to forget a name."""
        inval_entry = getattr(ll, "inval_entry", None)
        if inval_entry is None:
            return False
        try:
            st = self.union.lstat(path)[0]
        except OSError:
            return True         # gone meanwhile (unlinked, renamed): nothing to join
        ident = (st.st_dev, st.st_ino)
        parent, name = path.rsplit("/", 1)
        with self._table:
            first = self._by_ident.get(ident)
            if first is None or first.path is None:
                if inode is not None:
                    inode.ident = ident
                    self._by_ident[ident] = inode
                forget = None
            elif inode is not None and inode is not first:
                # Its node stays for open files (and for the kernel's entry
                # until the notification below lands), answered as a name
                # that has a new node (see getattr and open).
                if self._by_path.get(path) is inode:
                    del self._by_path[path]
                inode.alias = True
                inode.replaced = True
                forget = self._full_at(parent or "/")
            else:
                forget = None
        if forget is not None:
            # Sent from another thread, after this request: the kernel locks
            # the directory to forget the entry, and the request that copied
            # up (a link, a rename) may hold that lock until it is answered.
            self._later.call(inval_entry, forget.nodeid, os.fsencode(name))
        if inode is not None:
            ll.inval_inode(inode.nodeid, attrs_only=True)
        return True

    def _exchanged(self, a, b):
        """Swap in the table: what was at ``a`` (and below) is at ``b``, and
        the other way round."""
        with self._table:
            self._repath(((a, b), (b, a)), below=True)

    def _repath(self, moves, below):
        """For each (src, dst) of ``moves``: the table's entry at ``src``,
        and if ``below`` those under it, now live at ``dst``. All moves
        happen at once (an exchange). The caller holds the table lock."""
        moved = [(src, dst, self._full_at(src)) for src, dst in moves if src in self._by_path]
        if below:
            for p in list(self._by_path):
                for src, dst in moves:
                    if p.startswith(src + "/"):
                        moved.append((p, dst + p[len(src):], self._full_at(p)))
                        break
        for p, _, _ in moved:
            del self._by_path[p]
        for p, np, inode in moved:
            self._by_path[np] = inode
            if inode.path == p:
                inode.path = np

    # -- replies --------------------------------------------------------------------

    def _entry(self, path):
        """Look ``path`` up and build the entry reply for it."""
        return self._entry_ino(path)[0]

    def _entry_ino(self, path):
        """(the entry reply for ``path``, the inode number it shows)."""
        st, ino, layer, nlink = self.union.lstat_layer(path)
        nodeid, inode = self._remember(path, st, layer)
        alias = False
        if inode is not None:
            inode.ino = ino
            alias = inode.alias
        if self.union.ids is None:
            uid, gid = st.st_uid, st.st_gid
        else:
            uid, gid = self._shown_owner(st)
        return ll.entry(nodeid, st, ino, nlink, uid, gid,
                        0.0 if alias else self.timeout, self.timeout), ino

    def _reply_attr(self, req, st, ino, nlink=None, alias=False, timeout=None):
        """``nlink``: the link count to show (None: the backing one)."""
        if timeout is None:
            timeout = 0.0 if alias else self.timeout
        if self.union.ids is None:      # (_shown_owner, inlined: every attribute reply)
            uid, gid = st.st_uid, st.st_gid
        else:
            uid, gid = self._shown_owner(st)
        ll.reply_stat(req, st, ino, st.st_nlink if nlink is None else nlink, uid, gid, timeout)

    def _shown_owner(self, st):
        """(uid, gid) of ``st`` as the mount shows them (see idmap)."""
        ids = self.union.ids
        if ids is None:
            return st.st_uid, st.st_gid
        return ids.shown_uid(st.st_uid), ids.shown_gid(st.st_gid)

    @staticmethod
    def _owner(req):
        ctx = ll.req_ctx(req).contents
        return ctx.uid, ctx.gid

    # -- operations (each gets the C arguments; see binding OPS) -------------------

    def init(self, userdata, conn):
        ll.configure(conn)
        if self.on_init is not None:
            self.on_init()

    def lookup(self, req, parent, name):
        # (child_path and os.fsdecode, inlined: the most common request.)
        parent = self._path(parent)
        name = name.decode(_FS_ENCODING, _FS_ERRORS)
        path = "/" + name if parent == "/" else parent + "/" + name
        if self.union.stack.lookup(path) is None:
            ll.reply_entry(req, self._negative)
            return
        e = self._entry_ino(path)[0]
        if ll.reply_entry(req, e) == -errno.ENOENT:     # (_reply_entry, inlined)
            self._unlookup(e.ino)

    def forget(self, req, nodeid, nlookup):
        self._unlookup(nodeid, nlookup)
        ll.reply_none(req)

    def _unlookup(self, nodeid, nlookup=1):
        """Drop ``nlookup`` lookups of ``nodeid``: forgotten by the kernel,
        or never received (the reply that carried them could not be sent:
        the request was interrupted)."""
        with self._table:
            inode = self._inodes.get(nodeid)
            if inode.__class__ is str:              # compact: looked up once
                del self._inodes[nodeid]
                if self._by_path.get(inode) == nodeid:
                    del self._by_path[inode]
                return
            if inode is not None and nodeid != common.ROOT_ID:
                inode.nlookup -= nlookup
                if inode.nlookup <= 0:
                    del self._inodes[nodeid]
                    if inode.path is not None and self._by_path.get(inode.path) is inode:
                        del self._by_path[inode.path]
                    if inode.ident is not None and self._by_ident.get(inode.ident) is inode:
                        del self._by_ident[inode.ident]
                    if inode.ident is not None:
                        for p in [p for p, i in self._by_path.items() if i is inode]:
                            del self._by_path[p]

    def _reply_entry(self, req, e):
        # -ENOENT: the kernel gave up on the request (interrupted), so the
        # lookup this reply counted will never be forgotten by it.
        if ll.reply_entry(req, e) == -errno.ENOENT:
            self._unlookup(e.ino)

    def getattr(self, req, nodeid, fi):
        inode = self._inodes.get(nodeid)
        if inode.__class__ is str:          # compact: nothing else to know
            st, ino, nlink = self.union.lstat(inode)
            if self.union.ids is None:      # (_reply_attr, inlined: the common case)
                ll.reply_stat(req, st, ino, nlink, st.st_uid, st.st_gid, self.timeout)
            else:
                self._reply_attr(req, st, ino, nlink)
            return
        inode = self._inode(nodeid)
        if inode.path is None:
            with self._fds_lock:    # (see _reopen_unlinked)
                if not inode.fds:
                    raise OSError(errno.ENOENT, "unlinked")
                st = os.fstat(inode.fds[-1])
            self._reply_attr(req, st, inode.ino, alias=inode.alias)
            return
        if self._by_path.get(inode.path) is not inode:
            # Its name now has a new inode (_open_as_new_inode), which the
            # kernel keeps coherent; this one it is told nothing of, so it
            # must ask every time.
            self._reply_attr(req, *self.union.lstat(inode.path), timeout=0.0)
            return
        self._reply_attr(req, *self.union.lstat(inode.path), alias=inode.alias)

    def setattr(self, req, nodeid, a, to_set, fh):
        """``a``: the requested attributes as a SetAttr (copied from the
        request, which may be gone by the time a worker runs this)."""
        inode = self._inode(nodeid)
        u = self.union
        path = inode.path
        drop = 0
        st = None
        if not to_set or to_set & common.SET_ATTR_KILL_SUIDGID:
            # The kernel asks to remove set-id bits: with nothing to set
            # (before a write: file_remove_privs; a chown to -1:-1), or on
            # the truncate or chown it marks so (HANDLE_KILLPRIV_V2).
            st = os.fstat(fh) if path is None and fh is not None else u.lstat(self._path(nodeid))[0]
            drop = self._bits_to_drop(req, st)
        if to_set & common.SET_ATTR_SIZE:
            if fh is not None:
                os.ftruncate(fh, a.size)
            else:
                u.truncate(self._path(nodeid), a.size)
        if path is None:
            if to_set & ~(common.SET_ATTR_SIZE | common.SET_ATTR_KILL_SUIDGID) or fh is None:
                raise OSError(errno.ENOENT, "unlinked")
            if drop:
                os.fchmod(fh, stat.S_IMODE(os.fstat(fh).st_mode) & ~drop)
            self._reply_attr(req, os.fstat(fh), inode.ino, alias=inode.alias)
            return
        if to_set & common.SET_ATTR_MODE:
            u.chmod(path, a.mode)
        if to_set & (common.SET_ATTR_UID | common.SET_ATTR_GID):
            u.chown(path, a.uid if to_set & common.SET_ATTR_UID else -1,
                    a.gid if to_set & common.SET_ATTR_GID else -1,
                    st=None if to_set & (common.SET_ATTR_SIZE | common.SET_ATTR_MODE) else st)
        if to_set & (common.SET_ATTR_ATIME | common.SET_ATTR_MTIME
                     | common.SET_ATTR_ATIME_NOW | common.SET_ATTR_MTIME_NOW):
            now = time.time_ns()
            atime = mtime = None        # None: leave as is (UTIME_OMIT)
            if to_set & common.SET_ATTR_ATIME_NOW:
                atime = now
            elif to_set & common.SET_ATTR_ATIME:
                atime = a.atime_ns
            if to_set & common.SET_ATTR_MTIME_NOW:
                mtime = now
            elif to_set & common.SET_ATTR_MTIME:
                mtime = a.mtime_ns
            u.utimens(path, atime, mtime)
        if drop:
            mode = stat.S_IMODE(u.lstat(path)[0].st_mode)
            if mode & drop:
                u.chmod(path, mode & ~drop)
        self._reply_attr(req, *u.lstat(path), alias=inode.alias)

    def _drop_setid(self, req, nodeid, fd):
        """Remove the set-id bits a write or truncate through open ``fd`` by
        ``req``'s caller removes (the kernel marked the request so), and
        make the kernel forget the mode it caches."""
        st = os.fstat(fd)
        drop = self._bits_to_drop(req, st)
        if drop:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~drop)
            ll.inval_inode(nodeid, attrs_only=True)

    def _bits_to_drop(self, req, st):
        """The set-id bits a change by ``req``'s caller removes from a file
        of stat ``st`` (see killpriv)."""
        ctx = ll.req_ctx(req).contents
        ids = self.union.ids
        gid = st.st_gid if ids is None else ids.shown_gid(st.st_gid)
        return killpriv.bits_to_drop(st.st_mode, gid, ctx.gid, ctx.pid)

    def readlink(self, req, nodeid):
        ll.reply_readlink(req, os.fsencode(self.union.readlink(self._path(nodeid))))

    def _make(self, req, parent, name, make):
        path = child_path(self._path(parent), os.fsdecode(name))
        make(path, self._owner(req))
        self._reply_entry(req, self._entry(path))

    def mknod(self, req, parent, name, mode, rdev):
        self._make(req, parent, name, lambda p, o: self.union.mknod(p, mode, rdev, o))

    def mkdir(self, req, parent, name, mode):
        self._make(req, parent, name,
                   lambda p, o: self.union.mkdir(p, mode | _S_IFDIR, o))

    def symlink(self, req, target, parent, name):
        self._make(req, parent, name,
                   lambda p, o: self.union.symlink(p, os.fsdecode(target), o))

    def link(self, req, nodeid, newparent, newname):
        src = self._path(nodeid)
        path = child_path(self._path(newparent), os.fsdecode(newname))
        self.union.link(src, path)
        # Both names are now one upper file: make the old one findable by
        # its backing inode, so the new name joins the same kernel inode.
        st = self.union.lstat(src)[0]
        with self._table:
            inode = self._full(nodeid)
            if inode is not None:
                self._claim_ident(inode, (st.st_dev, st.st_ino))
        self._reply_entry(req, self._entry(path))

    def _claim_ident(self, inode, ident):
        """Make ``inode`` the node of upper file ``ident``, unless a live node
        already is (a node that node replaced must not take it back: its
        opens answer ESTALE). The caller holds the table lock."""
        first = self._by_ident.get(ident)
        if first is None or first.path is None or first is inode:
            inode.ident = ident
            self._by_ident[ident] = inode

    def unlink(self, req, parent, name):
        path = child_path(self._path(parent), os.fsdecode(name))
        self.union.unlink(path)
        self._forget_path(path)
        ll.reply_err(req, 0)

    def rmdir(self, req, parent, name):
        path = child_path(self._path(parent), os.fsdecode(name))
        self.union.rmdir(path)
        self._forget_path(path, tree=True)
        ll.reply_err(req, 0)

    def rename(self, req, parent, name, newparent, newname, flags=0):
        old = child_path(self._path(parent), os.fsdecode(name))
        new = child_path(self._path(newparent), os.fsdecode(newname))
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "rename flags not supported")
        if flags & RENAME_EXCHANGE:
            self.union.exchange(old, new)
            self._exchanged(old, new)
            ll.reply_err(req, 0)
            return
        self.union.rename(old, new, noreplace=bool(flags & RENAME_NOREPLACE))
        self._moved(old, new)
        ll.reply_err(req, 0)

    # -- files ----------------------------------------------------------------------

    def open(self, req, nodeid, flags, kill_suidgid=False):
        """``kill_suidgid``: the open truncates, and removes set-id bits."""
        held = self._inodes.get(nodeid)
        if held.__class__ is Inode and held.path is None:
            path = None
            fd = self._reopen_unlinked(held, flags)
        else:
            path = self._path(nodeid)
            if held.__class__ is Inode and held.replaced:
                # The name has another node now (_join, _open_as_new_inode)
                # that the kernel has not looked up yet: ESTALE has it look
                # the name up again and open that one.
                raise OSError(errno.ESTALE, "the name has a new node")
            fd = self.union.open(path, flags)
        if kill_suidgid:
            try:
                self._drop_setid(req, nodeid, fd)
            except BaseException:
                os.close(fd)
                raise
        inode = None
        try:
            fi = ll.fuse_file_info()
            fi.flags = flags
            fi.fh = fd
            inode = self._inode(nodeid)
            fi.keep_cache = not inode.alias     # see "Caching" in the module doc
            self._hold(inode, fd)
            if not inode.ino and path is not None:   # made from compact form: learn what fstat shows once unlinked
                inode.ino = self.union.lstat(path)[1]
        except BaseException:
            # (The error is the reply: the kernel will never release fd.)
            self._drop(inode, fd)
            raise
        sent = ll.reply_open(req, fi)
        if sent == -errno.ESTALE:
            self._open_as_new_inode(req, inode, path, fd)
        elif sent == -errno.ENOENT:         # interrupted: the kernel never releases it
            self._drop(inode, fd)

    def _reopen_unlinked(self, inode, flags):
        """A new descriptor on the file of ``inode``, whose name is gone.

        The kernel opens a node by its id, and can hold one whose name was
        unlinked meanwhile: an ``open(O_CREAT)`` racing an ``unlink`` of the
        same name, or an open of ``/proc/PID/fd/N``. On kernel overlayfs the
        first creates the file anew or opens the one still there; the second
        opens the same file. Here: the same file, through a descriptor the
        daemon still holds on it; with none (or a write to a lower file,
        which is never written), ESTALE, which has the kernel walk the path
        again and find the name as it is now."""
        with self._fds_lock:
            fds = inode.fds
            if not fds:
                raise OSError(errno.ESTALE, "unlinked: the kernel looks the name up again")
            fd = fds[-1]
            if flags & _WRITE_FLAGS:
                # Through a descriptor held for writing if any: the node may
                # hold one of its lower file too (read before a copy-up).
                writable = [f for f in fds
                            if fcntl.fcntl(f, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY]
                if writable:
                    fd = writable[-1]
                elif os.fstat(fd).st_nlink:
                    # Held read-only, and still linked: it may be a lower file.
                    raise OSError(errno.ESTALE, "unlinked lower file: not writable")
            return os.open(f"/proc/self/fd/{fd}",
                           flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))

    def _hold(self, inode, fd):
        """Count open ``fd`` as one of ``inode``'s (before the kernel can
        release it: its reply is not sent yet)."""
        fds = inode.fds
        if fds is None:
            with self._table:
                if inode.fds is None:
                    inode.fds = []
                fds = inode.fds
        fds.append(fd)

    def _drop(self, inode, fd):
        """Close ``fd``, one of ``inode``'s if it is held (inode may be
        None or a compact one)."""
        if inode.__class__ is not Inode or not inode.fds:
            os.close(fd)
            return
        with self._fds_lock:
            try:
                inode.fds.remove(fd)
            except ValueError:
                pass
            os.close(fd)

    def _open_as_new_inode(self, req, inode, path, fd):
        """The binding could not give the kernel open ``fd`` as ``inode``
        (the kernel passes the inode's I/O through to another file: the
        lower one, before this open copied it up). Give ``path`` a new node
        id and answer ESTALE: the kernel then looks the name up again and
        opens it as a new inode. Opens made before keep the old one, whose
        attributes the kernel must ask for from now on (see getattr)."""
        self._drop(inode, fd)
        with self._table:
            inode.replaced = True
            if self._by_path.get(path) is inode:
                del self._by_path[path]
            if inode.ident is not None and self._by_ident.get(inode.ident) is inode:
                del self._by_ident[inode.ident]
        ll.inval_inode(inode.nodeid, attrs_only=True)
        ll.reply_err(req, errno.ESTALE)

    def create(self, req, parent, name, mode, fi):
        path = child_path(self._path(parent), os.fsdecode(name))
        f = fi.contents
        fd = self.union.create(path, mode, f.flags, self._owner(req))
        try:
            e, ino = self._entry_ino(path)
        except BaseException:
            os.close(fd)
            raise
        f.fh = fd
        f.keep_cache = 1
        inode = self._inode(e.ino)
        inode.ino = ino
        self._hold(inode, fd)
        sent = ll.reply_create(req, e, fi)
        if sent == -errno.ENOENT:
            # Interrupted: the kernel will neither release the file nor
            # forget the lookup (the file stays created, as it would natively).
            self._drop(inode, fd)
            self._unlookup(e.ino)
        elif sent == -errno.ESTALE:         # not sent: see open
            self._unlookup(e.ino)
            self._open_as_new_inode(req, inode, path, fd)

    # Data moves between the backing file and /dev/fuse inside libfuse (C):
    # no Python bytes objects, and the GIL is free while it happens.

    def read(self, req, nodeid, size, off, fi):
        ll.reply_data(req, common.fd_bufvec(fi.contents.fh, size, off), 0)

    def write_buf(self, req, nodeid, bufv, off, fi):
        f = fi.contents
        if getattr(f, "kill_suidgid", False):
            self._drop_setid(req, nodeid, f.fh)
        dst = common.fd_bufvec(f.fh, ll.buf_size(bufv), off)
        n = ll.buf_copy(dst, bufv, 0)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        ll.reply_write(req, n)

    def release(self, req, nodeid, fi):
        fd = fi.contents.fh
        self._drop(self._inodes.get(nodeid), fd)
        ll.reply_err(req, 0)

    def fsync(self, req, nodeid, datasync, fh):
        (os.fdatasync if datasync else os.fsync)(fh)
        ll.reply_err(req, 0)

    # -- directories ------------------------------------------------------------------

    # Directory offsets. Every entry's offset is a 31-bit hash of its name
    # ("." and ".." are 1 and 2), and a listing is in offset order, as ext4's
    # hashed directories do. A reader resumed at an offset therefore goes on
    # after the same name in any version of the directory: a name that
    # nobody adds or removes meanwhile is listed exactly once, however the
    # directory changed, whether the kernel served the start from its
    # listing cache (FOPEN_CACHE_DIR) or lost that cache in between; offsets
    # stay below 2**31 for 32-bit programs. Names whose hashes collide share
    # an offset and go into one reply together. A reader that starts at 0
    # takes the directory as it is then and keeps that version to its end.

    def opendir(self, req, nodeid, fi):
        self._path(nodeid)
        with self._table:
            dh = self._next_dh
            self._next_dh += 1
            self._dirs[dh] = None
        f = fi.contents
        f.fh = dh
        if ll.CACHE_READDIR:
            # The kernel may keep the listing (see above); it drops it when
            # the directory changes, and only changes through it are possible.
            f.cache_readdir = 1
            f.keep_cache = 1
        ll.reply_open(req, fi)

    def _listing(self, nodeid, dh, off):
        """(listing, index): what to answer a readdir at ``off`` from."""
        listing = self._dirs[dh]
        if off == 0 or listing is None:
            listing = self._current_listing(self._inode(nodeid).path)
            with self._table:
                self._dirs[dh] = listing
        return listing, listing.start(off)

    def _current_listing(self, path):
        """The Listing of directory ``path`` as it is now."""
        if path is None:                    # removed while open
            return Listing(0, ())
        entries = self.union.listdir(path)
        with self._table:
            known = self._listings.get(path)
            if known is not None and known[0] is entries:
                return known[1]
        listing = Listing(self.union.lstat(path)[1],
                          [(os.fsencode(n), t, i) for n, t, i in entries])
        with self._table:
            # Bounded by entries, not directories: one huge directory must
            # not pin gigabytes; forgetting only costs building it again.
            self._listed += len(listing.entries)
            if self._listed > MAX_LISTED_ENTRIES:
                self._listings.clear()
                self._listed = len(listing.entries)
            self._listings[path] = (entries, listing)
        return listing

    def readdir(self, req, nodeid, size, off, fi):
        self._fill_dir(req, nodeid, size, off, fi, plus=False)

    def readdirplus(self, req, nodeid, size, off, fi):
        """readdir with each entry's attributes; every entry but . and ..
        counts as a lookup of it (the kernel will forget it)."""
        self._fill_dir(req, nodeid, size, off, fi, plus=True)

    def _fill_dir(self, req, nodeid, size, off, fi, plus):
        listing, start = self._listing(nodeid, fi.contents.fh, off)
        dirpath = self._inode(nodeid).path
        buf = ctypes.create_string_buffer(size)
        counted = []        # nodeids this reply looks up (readdirplus)
        sent = -errno.ENOENT
        try:
            pos = self._fill_entries(req, ctypes.addressof(buf), size, listing, start,
                                     dirpath, plus, counted)
            sent = ll.reply_buf(req, buf, pos)
        finally:
            # Not sent (an error reply instead, or the kernel gave up on the
            # request): the kernel will never forget these lookups.
            if sent == -errno.ENOENT:
                for ino in counted:
                    self._unlookup(ino)

    def _fill_entries(self, req, base, size, listing, start, dirpath, plus, counted):
        """Add the entries of ``listing`` from index ``start`` that fit in
        ``size`` bytes at address ``base``; returns the bytes used."""
        st = common.c_stat()        # readdir: a name's inode number and type
        entries, offs = listing.entries, listing.offs
        entry_size = ll.direntplus_size if plus else common.direntry_size
        pos = 0
        for i in range(start, len(entries)):
            name, ftype, ino = entries[i]
            if i + 1 < len(offs) and offs[i + 1] == offs[i] and (i == start or offs[i - 1] != offs[i]):
                # Names sharing one offset: all of them in this reply, or none.
                group = entries[i:listing.run_end(i)]
                if sum(entry_size(n) for n, _, _ in group) > size - pos:
                    break
            # An entry that does not fit must not be looked up (counted).
            if entry_size(name) > size - pos:
                break
            if not plus:
                st.st_ino = ino
                st.st_mode = ftype
                pos += ll.add_direntry(req, base + pos, size - pos, name, st, offs[i])
                continue
            entry = None
            if i >= 2 and dirpath is not None:
                try:
                    entry = self._entry(child_path(dirpath, os.fsdecode(name)))
                    counted.append(entry.ino)
                except OSError:
                    pass
            if entry is None:                   # no entry: just a name
                entry = ll.bare_entry(ino, ftype)
            pos += ll.add_direntry_plus(req, base + pos, size - pos, name, entry, offs[i])
        return pos

    def releasedir(self, req, nodeid, fi):
        with self._table:
            self._dirs.pop(fi.contents.fh, None)
        ll.reply_err(req, 0)

    def fsyncdir(self, req, nodeid, datasync, fi):
        ll.reply_err(req, 0)

    # -- the rest -------------------------------------------------------------------------

    def statfs(self, req, nodeid):
        sv = self.union.statfs()
        c = common.c_statvfs()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            if hasattr(c, k):
                setattr(c, k, getattr(sv, k))
        ll.reply_statfs(req, c)

    def setxattr(self, req, nodeid, name, value, flags):
        self.union.setxattr(self._path(nodeid), os.fsdecode(name), value, flags)
        ll.reply_err(req, 0)

    def getxattr(self, req, nodeid, name, size):
        data = self.union.xattr(self._path(nodeid), name.decode(_FS_ENCODING, _FS_ERRORS))
        if data is None:        # (no exception raised and caught: ls -l asks for many)
            ll.reply_err(req, errno.ENODATA)
            return
        self._reply_sized(req, data, size)

    def listxattr(self, req, nodeid, size):
        names = self.union.listxattr(self._path(nodeid))
        data = b"".join(os.fsencode(n) + b"\0" for n in names)
        self._reply_sized(req, data, size)

    @staticmethod
    def _reply_sized(req, data, size):
        if size == 0:
            ll.reply_xattr(req, len(data))
        elif len(data) > size:
            ll.reply_err(req, errno.ERANGE)
        else:
            ll.reply_buf(req, data, len(data))

    def removexattr(self, req, nodeid, name):
        self.union.removexattr(self._path(nodeid), os.fsdecode(name))
        ll.reply_err(req, 0)

    def access(self, req, nodeid, mask):
        # The kernel checks permissions itself (default_permissions).
        self._path(nodeid)
        ll.reply_err(req, 0)

    # -- dispatch ----------------------------------------------------------------------------

    # Requests that may take long -- a copy-up, large disk I/O, fsync -- run
    # on worker threads when the session loop is single-threaded, so lookups
    # and stats never wait behind them; the common quick case of each runs
    # inline (a thread hand-off costs more than it does). Each handler is
    # given plain values: the request's buffers and structures are gone once
    # the loop moves on, so the C-side arguments are copied first.
    MAY_BLOCK = {
        # name: (copy the C arguments, "does this call need a worker?")
        "open": (lambda req, ino, fi: (req, ino, fi.contents.flags,
                                       getattr(fi.contents, "kill_suidgid", False)),
                 lambda self, req, ino, flags, kill_suidgid: bool(flags & _WRITE_FLAGS)
                 and not self._settled(ino)),
        "fsync": (lambda req, ino, datasync, fi: (req, ino, datasync, fi.contents.fh),
                  lambda self, *args: True),
        "setattr": (lambda req, ino, attr, to_set, fi:
                    (req, ino, SetAttr(attr.contents), to_set, fi.contents.fh if fi else None),
                    lambda self, req, ino, a, to_set, fh:
                    not self._settled(ino, meta=not to_set & common.SET_ATTR_SIZE)),
        "setxattr": (lambda req, ino, name, value, size, flags:
                     (req, ino, name, ctypes.string_at(value, size), flags),
                     lambda self, req, ino, *rest: not self._settled(ino, meta=True)),
        "removexattr": (lambda *args: args,
                        lambda self, req, ino, name: not self._settled(ino, meta=True)),
        "rename": (lambda *args: args,
                   lambda self, req, parent, name, newparent, newname, flags=0:
                   not self._settled_name(parent, name)
                   or bool(flags & RENAME_EXCHANGE) and not self._settled_name(newparent, newname)),
        "link": (lambda *args: args,
                 lambda self, req, ino, *rest: not self._settled(ino)),
    }
    # flush is left out on purpose: libfuse then answers ENOSYS once and the
    # kernel stops sending it (there is nothing to flush: writes are not
    # buffered here), which saves a request per close().
    QUICK = ("lookup", "getattr", "readlink", "mknod", "mkdir", "unlink", "rmdir",
             "symlink", "create", "read", "write_buf", "release", "opendir", "readdir",
             "readdirplus", "releasedir", "fsyncdir", "statfs", "getxattr", "listxattr", "access")

    def _settled(self, nodeid, meta=False):
        """True if changing ``nodeid`` needs no copy-up of data (quick to
        change); ``meta``: as Union.settled."""
        path = self._path_of(nodeid)
        if path is None:
            return True             # fails fast with an error
        return self.union.settled(path, meta)

    def _settled_name(self, parent, name):
        path = self._path_of(parent)
        if path is None:
            return True
        return self.union.settled(child_path(path, os.fsdecode(name)))

    def handlers(self, workers=None):
        """Callables for the binding's run(); each answers its request exactly once.

        ``workers``: a Workers pool for requests that may block, or None to
        run everything on the calling thread (a multi-threaded session loop).
        """
        # forget has no reply to send, not even an error.
        out = {"init": self.init, "forget": self.forget}
        for name in self.QUICK:
            out[name] = self._dispatch(name, getattr(self, name))
        for name, (copy, blocks) in self.MAY_BLOCK.items():
            call = self._dispatch(name, getattr(self, name))
            out[name] = self._deferring(call, copy, blocks, workers)
        return out

    def _deferring(self, call, copy, blocks, workers):
        if workers is None:
            return lambda *a: call(*copy(*a))
        submit = workers.submit

        def handler(*a):
            args = copy(*a)
            if blocks(self, *args):
                submit(call, args)
            else:
                call(*args)
        return handler

    def _dispatch(self, name, method):
        """``method`` as a handler of request ``name``: errors answered, and
        timed into the request's histogram if stats are kept (one wrapper,
        not two: it runs for every request)."""
        reply_err = ll.reply_err
        if self.watch is None:
            def call(req, *args):
                try:
                    method(req, *args)
                except OSError as e:
                    reply_err(req, e.errno or errno.EIO)
                except Exception:
                    _log_failure(name)
                    reply_err(req, errno.EIO)
            return call
        from unionfs.observe import _SUB as sub     # loaded already: watch is a Recorder
        hist, local = self.watch.timer(name)
        clock = time.perf_counter_ns
        sub_mask = (1 << sub) - 1

        def timed(req, *args):
            local.op = name
            t0 = clock()
            try:
                method(req, *args)
            except OSError as e:
                reply_err(req, e.errno or errno.EIO)
            except Exception:
                _log_failure(name)
                reply_err(req, errno.EIO)
            finally:
                # observe.bucket_of, inlined.
                ns = clock() - t0
                b = ns.bit_length()
                hist[(b << sub) | ((ns >> (b - 1 - sub)) & sub_mask) if b > sub else ns] += 1
        return timed


def _log_failure(name):
    import logging      # only here: a daemon start need not load it
    logging.getLogger("unionfs").exception("unionfs: %s failed", name)


# Entry offsets: "." 1, ".." 2, any other name a hash of it in [3, 2**31).
_FIRST_NAME_OFF = 3
_NAME_OFF_SPAN = (1 << 31) - _FIRST_NAME_OFF


def name_offset(name):
    """The readdir offset of the entry ``name`` (bytes), in every listing."""
    return _FIRST_NAME_OFF + zlib.crc32(name) % _NAME_OFF_SPAN


class Listing:
    """One version of a directory's entries, in offset order: ``entries``
    (name bytes, file type, inode number) and their ``offs``."""

    __slots__ = ("entries", "offs")

    def __init__(self, ino, entries):
        named = sorted((name_offset(n), n, t, i) for n, t, i in entries)
        self.entries = [(b".", _S_IFDIR, ino), (b"..", _S_IFDIR, ino)]
        self.entries += [(n, t, i) for _, n, t, i in named]
        self.offs = [1, 2] + [o for o, _, _, _ in named]

    def start(self, off):
        """The index of the first entry after offset ``off``."""
        return bisect.bisect_right(self.offs, off)

    def run_end(self, i):
        """The end of the run of entries that share entry ``i``'s offset."""
        return bisect.bisect_right(self.offs, self.offs[i], i)


class SetAttr:
    """The fields of a setattr request, copied out of libfuse's struct stat."""

    __slots__ = ("size", "mode", "uid", "gid", "atime_ns", "mtime_ns")

    def __init__(self, st):
        self.size = st.st_size
        self.mode = st.st_mode
        self.uid = st.st_uid
        self.gid = st.st_gid
        self.atime_ns = st.st_atimespec.tv_sec * 1_000_000_000 + st.st_atimespec.tv_nsec
        self.mtime_ns = st.st_mtimespec.tv_sec * 1_000_000_000 + st.st_mtimespec.tv_nsec


class _Later:
    """Calls made after the request that asked for them, in order, by one
    thread started on first use (notifications that may wait for a lock a
    request holds until it is answered)."""

    def __init__(self):
        self._queue = SimpleQueue()
        self._thread = None
        self._start = threading.Lock()

    def call(self, fn, *args):
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="unionfs-later",
                                                daemon=True)
                self._thread.start()
        self._queue.put((fn, args))

    def _run(self):
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:
                import logging
                logging.getLogger("unionfs").exception("unionfs: a notification failed")


class Workers:
    """A few threads that run slow requests handed off by the session loop.
    Started at the first such request, not before the daemon serves: a
    container start waits for the first replies, and may never need them."""

    def __init__(self, count=4):
        self._queue = SimpleQueue()
        self._count = count
        self._threads = []
        self._start = threading.Lock()

    def submit(self, fn, args):
        if not self._threads:
            with self._start:
                if not self._threads:
                    threads = [threading.Thread(target=self._run, name=f"unionfs-worker-{i}",
                                                daemon=True) for i in range(self._count)]
                    for t in threads:
                        t.start()
                    self._threads = threads
        self._queue.put((fn, args))

    def _run(self):
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args = item
            fn(*args)

    def stop(self):
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)
