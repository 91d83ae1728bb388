"""The layer stack and path lookup (overlayfs's namei.c).

A *merged path* is an absolute path in the mounted view ("/", "/etc/passwd").
No backing file is reached by an absolute path: every syscall on a layer goes
through ``Layer``, relative to a directory descriptor (``openat``,
``fstatat``, ``renameat2``, ... with ``dir_fd=``). ``Layer.dir`` opens the
directory of a merged path one component at a time with
``O_PATH|O_NOFOLLOW|O_DIRECTORY`` from the nearest cached ancestor, so

- a symlink inside a layer is never followed while resolving a path (the
  kernel opens each component only if it is a real directory);
- a merged path of any length works (each call names one component);
- an operation reaches the directory it looked up, even if a parent is
  renamed meanwhile.

Invariants the caches rely on:
- lower layers never change while mounted (documented as undefined), so what
  a lower directory holds is read once (``DirIndex``) and kept;
- the upper is changed only by this daemon, and every change calls
  ``LayerStack.invalidate`` for the paths it touched, after touching them.
"""

# _thread, _collections: the C modules under threading and collections, which
# a mount command would load only for these (~3 ms of its start; see
# docs/PERFORMANCE.md, "Start-up"). threading.Lock is _thread.allocate_lock,
# threading.local is _thread._local, collections.deque and OrderedDict are _collections'.
import _thread
import errno
import os
import stat
from _collections import OrderedDict

from unionfs import osutil
from unionfs import whiteout as wh

# Entry kinds as seen in one layer.
DIR = "d"        # a directory (merges with directories below)
NONDIR = "n"     # anything else that is visible: hides every layer below
WHITEOUT = "w"   # a whiteout: hides the name in every layer below

# Bounds on what is cached per path; past one a cache starts over (the
# newest entry stays). Everything cached here is re-derived on demand, while
# the daemon's memory must stay proportional to what the kernel holds (the
# inode table of fs.py), not to every path ever looked at: a `find` over
# 500k files would otherwise keep ~600 bytes per file in these caches alone.
MAX_CACHED_NODES = 32_768           # resolved paths (Node)
MAX_CACHED_LISTED = 16_384          # entries of cached merged listings
MAX_INDEXED_NAMES = 131_072         # names in the DirIndex caches of all lowers
# Directory descriptors kept open, shared out among the layers of a stack
# (each layer keeps at least MIN_DIRFDS): a cache miss costs one openat per
# missing component, so a few hundred cover the working set of a tree walk.
DIRFD_BUDGET = 1024
MIN_DIRFDS = 32

_O_DIRFD = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK


def child_path(parent, name):
    return "/" + name if parent == "/" else parent + "/" + name


def split_path(path):
    """'/a/b' -> ('/a', 'b'); '/a' -> ('/', 'a')."""
    parent, _, name = path.rpartition("/")
    return (parent or "/"), name


# How many forks away from the process that loaded this module (see DirFd).
_FORK_DEPTH = [0]
os.register_at_fork(after_in_child=lambda: _FORK_DEPTH.__setitem__(0, _FORK_DEPTH[0] + 1))


class DirFd:
    """An ``O_PATH`` descriptor of one backing directory.

    Closed when the last holder drops it, not when the cache evicts it: a
    caller that took it from the cache keeps it valid for as long as it
    holds it, even if another thread evicts it meanwhile (the number is
    never closed under it and handed out again). It converts to its fd
    (``__index__``), so it is passed as ``dir_fd=`` itself and the call
    holds it.

    Only the process that opened it closes it: after a fork (the daemon
    is forked from the mount command, or from a program using the Python
    API) objects of the parent's heap may be collected in the child, where
    their numbers were closed (mount.py drops inherited fds) and may name
    the child's own files by then -- /dev/fuse among them. A child thus
    never closes what its parent opened (the few a daemon inherits from
    the union its parent set up stay open for its life).

    ``impure``: the directory is known to carry overlayfs's impure mark
    (metacopy.mark_impure); a property of the directory the descriptor
    holds, so it cannot go stale when a name is reused.
    """

    __slots__ = ("fd", "forks", "impure")

    def __init__(self, fd):
        self.fd = fd
        self.forks = _FORK_DEPTH[0]
        self.impure = False

    def __index__(self):
        return self.fd

    # (bound now: usable at exit too)
    def __del__(self, _close=os.close, _depth=_FORK_DEPTH):
        if self.forks == _depth[0]:
            _close(self.fd)


def open_dir(dir_fd, name):
    """The DirFd of directory ``name`` in ``dir_fd``, never through a
    symlink: ENOTDIR if ``name`` is anything but a directory (with
    O_NOFOLLOW|O_DIRECTORY the kernel refuses a symlink as it refuses a
    file; tests/test_layers_dirfd.py checks it)."""
    return DirFd(os.open(name, _O_DIRFD, dir_fd=dir_fd))


# The xattr calls have no *at form in Python 3.11. They reach entry NAME of
# a directory fd N either by /proc/self/fd/N/NAME (a path of the directory
# itself, whatever its real path, but one that leaves the kernel's RCU path
# walk: about 2 us more per call), or -- in a process that turned
# ``thread_cwd`` on (the daemon: it owns its process) -- by NAME relative to
# the calling thread's working directory, moved to N for the call and back
# (each thread gets a working directory of its own first: unshare(CLONE_FS)).
thread_cwd = False
_cwd = _thread._local()


def _home():
    """This thread's own working directory (an O_PATH fd), or None."""
    home = getattr(_cwd, "fd", False)
    if home is False:
        home = None
        if thread_cwd and osutil.unshare_fs():
            home = DirFd(os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        _cwd.fd = home
    return home


def xattr_call(call, dir_fd, name, *args):
    """``call(path, *args, follow_symlinks=False)`` (an os.*xattr function)
    on entry ``name`` of ``dir_fd``."""
    home = _home()
    if home is None:
        return call(f"/proc/self/fd/{dir_fd.fd}/{name}", *args, follow_symlinks=False)
    os.fchdir(dir_fd.fd)
    try:
        return call(name, *args, follow_symlinks=False)
    finally:
        os.fchdir(home.fd)


class OpenDir:
    """A directory of a layer opened for listing: ``with layer.scandir(p)
    as it: for e in it`` (``e.stat()`` works inside the block only)."""

    __slots__ = ("fd", "_it")

    def __init__(self, fd):
        self.fd = fd
        self._it = None

    def __enter__(self):
        try:
            self._it = os.scandir(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        return self._it

    def __exit__(self, *exc):
        self._it.close()
        os.close(self.fd)

    def __iter__(self):
        return self._it


class DirIndex:
    """What one directory of an immutable lower layer holds, read once."""

    __slots__ = ("kinds", "opaque")

    def __init__(self, kinds, opaque):
        self.kinds = kinds      # name -> DIR | NONDIR | WHITEOUT
        self.opaque = opaque    # None: no marker file; the xattr not asked yet


class IndexBudget:
    """The names the DirIndex caches of a stack's lower layers hold, shared
    by all of them: 128 layers of 5,000 files each must not hold 128 times
    what one layer may. It holds the layers' caches, not the layers (no
    cycle: a Layer's descriptors close when the Layer goes)."""

    __slots__ = ("caches", "used")

    def __init__(self, layers):
        self.caches = [layer._dirs for layer in layers]
        self.used = 0

    def clear(self):
        for dirs in self.caches:
            dirs.clear()            # read again when asked: lowers never change
        self.used = 0


class Layer:
    """One backing directory of the stack. All reads of a layer go through here,
    and every syscall on it (see the module doc): each method takes a merged
    path and works relative to the descriptor of its parent directory.

    ``index`` is the position in the stack (0 = top-most). ``ino_tag`` is or'ed
    into the inode numbers of this layer's entries (see inodes.py).
    ``follow_root``: whether ``root`` itself may be a symlink (a layer given
    by the user may; the work dir, whose contents get deleted, may not).

    Directory descriptors are cached by merged path (LRU, ``max_dirfds``).
    Lower layers never change, so theirs never go stale; the upper's are
    dropped by ``forget_dirs`` (LayerStack.invalidate) when a directory is
    renamed or removed, and one opened while that happened is not kept
    (the generation check, as for lookups).
    """

    def __init__(self, root, index, upper=False, ino_tag=0, follow_root=True):
        self.root = os.path.abspath(root).rstrip("/")
        self.index = index
        self.upper = upper
        self.ino_tag = ino_tag
        self._dirs = {}         # lower layers only: merged dir path -> DirIndex
        self._budget = IndexBudget([self])  # shared with the stack's other lowers
        self._links = None      # lower layers only: inode -> its names (names_of)
        # (A trailing slash makes the last component resolve even if a symlink.)
        self.fd = open_dir(None, self.root + "/" if follow_root else self.root)
        self.max_dirfds = DIRFD_BUDGET
        self._dirfds = OrderedDict()    # merged dir path -> DirFd
        self._dirfd_gen = 0
        self._dirfd_lock = _thread.allocate_lock()
        self.alone = (self,)    # the ``layers`` of a Node this layer alone makes

    def __repr__(self):
        return f"Layer({self.root!r}, {'upper' if self.upper else 'lower'} #{self.index})"

    # -- directory descriptors ---------------------------------------------------

    def dir(self, path):
        """The DirFd of directory ``path`` of this layer. Raises
        FileNotFoundError, or ENOTDIR if a component is not a directory
        (a symlink included)."""
        d = self._dirfds.get(path)
        if d is not None:
            try:
                self._dirfds.move_to_end(path)
            except KeyError:
                pass            # evicted by another thread meanwhile: still ours
            return d
        if path == "/":
            return self.fd
        gen = self._dirfd_gen
        # From the nearest cached ancestor down, one component at a time.
        names = []
        p = path
        while True:
            p, _, name = p.rpartition("/")
            names.append(name)
            if not p:
                p, d = "/", self.fd
                break
            d = self._dirfds.get(p)
            if d is not None:
                break
        for name in reversed(names):
            d = open_dir(d, name)
            p = "/" + name if p == "/" else p + "/" + name
            self._keep(gen, p, d)
        return d

    def _keep(self, gen, path, d):
        with self._dirfd_lock:
            if gen == self._dirfd_gen:
                self._dirfds[path] = d
                if len(self._dirfds) > self.max_dirfds:
                    self._dirfds.popitem(last=False)

    def descriptors(self):
        """The numbers of the descriptors this layer holds: its root's and
        its cached directories'."""
        return [self.fd.fd, *(d.fd for d in list(self._dirfds.values()))]

    def forget_dirs(self, path, tree=False):
        """Drop the cached descriptor of ``path`` (and with ``tree`` those
        below it): it was renamed or removed."""
        with self._dirfd_lock:
            self._dirfd_gen += 1
            self._dirfds.pop(path, None)
            if tree:
                if path == "/":
                    self._dirfds.clear()
                    return
                prefix = path + "/"
                # list() copies the keys in one step: dir() may reorder
                # the cache meanwhile (move_to_end takes no lock).
                for key in [k for k in list(self._dirfds) if k.startswith(prefix)]:
                    self._dirfds.pop(key, None)

    def at(self, path):
        """(DirFd of the parent, name) of merged ``path``: its *at form."""
        if path == "/":
            return self.fd, "."
        parent, _, name = path.rpartition("/")
        return self.dir(parent or "/"), name

    # -- syscalls on entries (never following a symlink in the last place) ------

    def lstat(self, path):
        d, name = self.at(path)
        return os.stat(name, dir_fd=d, follow_symlinks=False)

    def exists(self, path):
        """lexists(): True if ``path`` names an entry of any type here
        (False on any error, as os.path.lexists: e.g. a marker name that
        would be too long cannot exist)."""
        try:
            self.lstat(path)
        except OSError:
            return False
        return True

    def open(self, path, flags, mode=0o777):
        d, name = self.at(path)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=d)

    def scandir(self, path):
        """``with layer.scandir(path) as it``: the entries of directory ``path``."""
        return OpenDir(os.open(".", _O_LIST, dir_fd=self.dir(path)))

    def readlink(self, path):
        d, name = self.at(path)
        return os.readlink(name, dir_fd=d)

    def mkdir(self, path, mode):
        d, name = self.at(path)
        os.mkdir(name, mode, dir_fd=d)

    def mknod(self, path, mode, dev=0):
        d, name = self.at(path)
        os.mknod(name, mode, dev, dir_fd=d)

    def symlink(self, target, path):
        d, name = self.at(path)
        os.symlink(target, name, dir_fd=d)

    def unlink(self, path):
        d, name = self.at(path)
        os.unlink(name, dir_fd=d)

    def rmdir(self, path):
        d, name = self.at(path)
        os.rmdir(name, dir_fd=d)

    def chmod(self, path, mode, follow_symlinks=False):
        """``follow_symlinks=True`` only for an entry known not to be a
        symlink (a copy just made); the no-follow form is one fchmodat2
        (osutil.lchmod: glibc would emulate it through /proc)."""
        d, name = self.at(path)
        if follow_symlinks:
            os.chmod(name, mode, dir_fd=d)
        else:
            osutil.lchmod(name, mode, dir_fd=d)

    def chown(self, path, uid, gid):
        d, name = self.at(path)
        os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)

    def utime(self, path, ns):
        d, name = self.at(path)
        os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)

    def utimes_ns(self, path, atime_ns, mtime_ns):
        """Set the times of ``path``; None for either leaves it (UTIME_OMIT)."""
        d, name = self.at(path)
        osutil.lutimes_ns(name, atime_ns, mtime_ns, dir_fd=d)

    def link(self, path, dst_layer, dst_path):
        """Hard-link ``path`` of this layer as ``dst_path`` of ``dst_layer``."""
        d, name = self.at(path)
        dd, dname = dst_layer.at(dst_path)
        os.link(name, dname, src_dir_fd=d, dst_dir_fd=dd, follow_symlinks=False)

    def rename(self, path, dst_layer, dst_path, flags=0):
        """renameat2() of ``path`` to ``dst_path`` of ``dst_layer`` (the
        upper and the work dir: one filesystem), with osutil's ``flags``."""
        d, name = self.at(path)
        dd, dname = dst_layer.at(dst_path)
        if flags:
            osutil.rename2(name, dname, flags, d.fd, dd.fd)
        else:
            os.rename(name, dname, src_dir_fd=d, dst_dir_fd=dd)

    def statvfs(self):
        return os.statvfs(self.fd.fd)

    # xattrs: see xattr_call; never following the entry itself.

    def getxattr(self, path, attr):
        return xattr_call(os.getxattr, *self.at(path), attr)

    def listxattr(self, path):
        return xattr_call(os.listxattr, *self.at(path))

    def setxattr(self, path, attr, value, flags=0):
        xattr_call(os.setxattr, *self.at(path), attr, value, flags)

    def removexattr(self, path, attr):
        xattr_call(os.removexattr, *self.at(path), attr)

    def setxattrs(self, path, items):
        """setxattr of each (name, value) of ``items``, in order: the
        directory is reached once for all of them (see xattr_call)."""
        def set_all(target, follow_symlinks):
            for attr, value in items:
                os.setxattr(target, attr, value, follow_symlinks=follow_symlinks)
        xattr_call(set_all, *self.at(path))

    def names_of(self, ino):
        """Every path of this lower layer that names inode ``ino`` (a
        non-directory with several names). The layer is walked once, on the
        first call: lowers never change, and only a copy-up of a hard link
        asks."""
        if self._links is None:
            links = {}
            todo = ["/"]
            while todo:
                d = todo.pop()
                try:
                    it = self.scandir(d)
                except PermissionError:
                    continue        # unreadable to this daemon: no names there
                with it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            todo.append(child_path(d, e.name))
                            continue
                        st = e.stat(follow_symlinks=False)
                        if st.st_nlink > 1 and not e.name.startswith(wh.WH_PREFIX):
                            links.setdefault(st.st_ino, []).append(child_path(d, e.name))
            self._links = links
        return self._links.get(ino, ())

    # -- lookup primitives ------------------------------------------------

    def child_kind(self, parent, name, markers=True):
        """Kind of ``name`` inside directory ``parent`` of this layer, or None.

        ``markers=False``: an OCI marker of ``name`` is not looked for in the
        upper (one lstat less); for a directory nothing lies below, where
        a marker would hide nothing (and the daemon writes none there).
        """
        if not self.upper:
            idx = self._dirs.get(parent)
            if idx is None:
                idx = self._load(parent)
            return idx.kinds.get(name)
        try:
            st = self.lstat(child_path(parent, name))
        except (FileNotFoundError, NotADirectoryError):
            if markers and self.exists(child_path(parent, wh.WH_PREFIX + name)):
                return WHITEOUT
            return None
        if stat.S_ISDIR(st.st_mode):
            return DIR
        if wh.is_whiteout_stat(st):
            return WHITEOUT
        return NONDIR

    def is_opaque(self, path):
        """True if directory ``path`` of this layer hides the layers below.

        Asked of every directory a lookup finds, so it does not read the
        directory (``_load``): a listing of a directory of 5000 directories
        would index all of their entries, more than the DirIndex cache
        holds, and each would be read again when it is entered."""
        if not self.upper:
            idx = self._dirs.get(path)
            if idx is not None:
                if idx.opaque is None:      # (read, but not asked: see scan)
                    idx.opaque = wh.has_opaque_xattr(path, self)
                return idx.opaque
        return wh.has_opaque_xattr(path, self) or self.exists(
            child_path(path, wh.WH_OPAQUE))

    def _load(self, path):
        """Read lower directory ``path`` once: its entries, whiteouts, opacity."""
        return self.scan(path)[0]

    def scan(self, path):
        """Read lower directory ``path``: (its DirIndex, now cached, and
        ``[(name, file type bits, inode)]`` of the entries it shows, in
        directory order, and the names its whiteouts hide below it).

        One read serves both the lookups and the merged listing
        (readdir.merged_entries): a listing is mostly followed by the
        lookup of every name in it, which would read the directory again."""
        kinds = {}
        shown = []
        hidden = []
        # Opaque by its marker file, or else maybe by its xattr: asked by
        # is_opaque, only if ever needed (rarely: see LayerStack._lookup_in).
        opaque = None
        try:
            it = self.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            it = None
        if it is not None:
            with it:
                for e in it:
                    name = e.name
                    if name.startswith(wh.WH_PREFIX):
                        if name == wh.WH_OPAQUE:
                            opaque = True
                        elif not name.startswith(wh.WH_PREFIX + wh.WH_PREFIX):
                            hidden.append(name[len(wh.WH_PREFIX):])
                        # other ".wh..wh.*" names are aufs metadata: ignored.
                        continue
                    if e.is_dir(follow_symlinks=False):
                        kinds[name] = DIR
                        ftype = _S_IFDIR
                    elif e.is_symlink():
                        kinds[name] = NONDIR
                        ftype = _S_IFLNK
                    elif e.is_file(follow_symlinks=False):
                        kinds[name] = NONDIR
                        ftype = _S_IFREG
                    else:
                        st = e.stat(follow_symlinks=False)
                        if wh.is_whiteout_stat(st):
                            kinds[name] = WHITEOUT
                            hidden.append(name)
                            continue
                        kinds[name] = NONDIR
                        ftype = stat.S_IFMT(st.st_mode)
                    shown.append((name, ftype, e.inode()))
        for name in hidden:
            # An entry present in the same layer as its marker stays visible.
            kinds.setdefault(name, WHITEOUT)
        idx = DirIndex(kinds, opaque)
        # (No lock: two threads reading one directory at once may count
        # it twice, which only brings the next clear() nearer.)
        budget = self._budget
        old = self._dirs.get(path)
        if old is not None:
            budget.used -= len(old.kinds)   # read again: counted once
        if budget.used + len(kinds) > MAX_INDEXED_NAMES:
            budget.clear()
        self._dirs[path] = idx
        budget.used += len(kinds)
        return idx, shown, hidden


class Node:
    """The result of a merged lookup.

    ``layers`` holds the layers that contribute, top-most first: for a
    directory every layer where it is a directory down to the first opaque
    one; for anything else exactly one layer. ``ino``: the inode number it
    shows, once known; ``data``: see ``Union._learn``.
    """

    __slots__ = ("kind", "layers", "ino", "data", "hidden_links", "xattrs")

    def __init__(self, kind, layers):
        self.kind = kind
        self.layers = layers
        self.ino = None
        self.data = None    # a metacopy's lower data path (Union._learn)
        self.hidden_links = 0
        self.xattrs = None  # its xattr names, once listed (Union._xattr_names)

    @property
    def is_dir(self):
        return self.kind == DIR

    @property
    def top(self):
        return self.layers[0]

    @property
    def in_upper(self):
        return self.layers[0].upper

    def __repr__(self):
        return f"Node({self.kind}, {self.layers})"


_MISS = object()
# Cached for a name that does not show because the upper holds a whiteout
# for it (LayerStack.upper_whiteout); lookup() answers None for it.
_WHITED_OUT = object()


class LayerStack:
    """The upper (optional) over the lowers, with a cache of resolved paths."""

    def __init__(self, upper, lowers):
        self.upper = upper
        self.lowers = list(lowers)
        self.layers = ([upper] if upper is not None else []) + self.lowers
        budget = IndexBudget(self.lowers)
        for layer in self.lowers:
            layer._budget = budget
        self._cache = {}
        self._listings = {}         # merged dir path -> its merged entries
        self._listed = 0            # entries held by _listings
        self._gen = 0
        self._cache_lock = _thread.allocate_lock()

    # -- lookup -------------------------------------------------------------

    def lookup(self, path):
        """Resolve merged ``path`` to a Node, or None if it does not exist.

        Raises ENOTDIR if a component before the last is not a directory.
        Lock-free: a result computed while the upper changed is not cached
        (the generation check), so the cache never holds a stale answer.
        """
        node = self._cache.get(path, _MISS)
        if node is not _MISS:
            return None if node is _WHITED_OUT else node
        gen = self._gen
        if path == "/":
            node = self._lookup_in("/", None, self.layers, root=True)
        else:
            parent_path, _, name = path.rpartition("/")
            parent_path = parent_path or "/"
            # Mostly the parent was just looked up (a walk, a listing).
            parent = self._cache.get(parent_path, _MISS)
            if parent is _MISS:
                parent = self._lookup_walk(parent_path)
            if parent is None or parent is _WHITED_OUT:
                return None
            if parent.kind != DIR:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            node = self._lookup_in(parent_path, name, parent.layers)
        self._store(gen, path, node)
        return None if node is _WHITED_OUT else node

    def _lookup_walk(self, path):
        """Iterative lookup from the deepest cached ancestor (no recursion,
        so paths deeper than the interpreter's recursion limit work)."""
        todo = []
        p = path
        while p != "/" and p not in self._cache:
            todo.append(p)
            p = split_path(p)[0]
        node = self.lookup(p)
        for p in reversed(todo):
            if node is None:
                return None
            if node.kind != DIR:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), p)
            node = self.lookup(p)
        return node

    def _lookup_in(self, parent, name, layers, root=False):
        if not root and name.startswith(wh.WH_PREFIX):
            return None     # markers are never entries (see whiteout.py)
        path = "/" if root else child_path(parent, name)
        dirs = []
        for layer in layers:
            if root:
                kind = DIR      # (a layer's root is a directory: Layer())
            else:
                kind = layer.child_kind(parent, name, markers=len(layers) > 1)
            if kind is None:
                continue
            if kind == WHITEOUT:
                if layer.upper and not dirs:
                    return _WHITED_OUT
                break
            if kind == DIR:
                # Whether the directory above is opaque matters only now
                # that a layer below has one too: a directory of one layer
                # (most of any image) costs no opacity check at all.
                if dirs and dirs[-1].is_opaque(path):
                    break
                dirs.append(layer)
                continue
            if dirs:
                break       # a directory above hides a non-directory below
            return Node(NONDIR, layer.alone)
        if not dirs:
            return None
        return Node(DIR, dirs[0].alone if len(dirs) == 1 else tuple(dirs))

    def upper_whiteout(self, path):
        """True if ``path`` (which shows nothing) shows nothing because the
        upper holds a whiteout for it: then a new entry must replace it.
        Answered from the lookup that found ``path`` missing while it is
        cached (the daemon makes every change to the upper, and drops what
        it changes from the cache), else asked of the layers again; as
        lookups do, an OCI marker counts only where lower layers lie below."""
        node = self._cache.get(path, _MISS)
        if node is _MISS:
            parent_path, name = split_path(path)
            parent = self.lookup(parent_path)
            if parent is None or parent.kind != DIR:
                return False
            node = self._lookup_in(parent_path, name, parent.layers)
        return node is _WHITED_OUT

    def lookup_below(self, path):
        """What shows at ``path`` if the upper had no entry there (None if
        nothing). Used to decide whether a removal needs a whiteout."""
        if path == "/":
            return None
        parent_path, name = split_path(path)
        parent = self.lookup(parent_path)
        if parent is None or parent.kind != DIR:
            return None
        layers = tuple(l for l in parent.layers if not l.upper)
        return self._lookup_in(parent_path, name, layers) if layers else None

    # -- cache maintenance ----------------------------------------------------

    def _store(self, gen, path, node):
        with self._cache_lock:
            if gen == self._gen:
                if len(self._cache) >= MAX_CACHED_NODES:
                    self._cache.clear()
                self._cache[path] = node

    def listing(self, path, node, compute):
        """The merged entries of directory ``path``: ``compute(path, node)``
        once, then from the cache until something in it changes."""
        entries = self._listings.get(path)
        if entries is None:
            gen = self._gen
            entries = compute(path, node)
            with self._cache_lock:
                if gen == self._gen:
                    self._drop_listing(path)    # another thread's, just made
                    self._listed += len(entries)
                    if self._listed > MAX_CACHED_LISTED:
                        self._listings.clear()
                        self._listed = len(entries)
                    self._listings[path] = entries
        return entries

    def prime(self, path, node):
        """Record the node of an entry just created (after invalidate())."""
        with self._cache_lock:
            self._cache[path] = node

    def invalidate(self, path, tree=False):
        """Forget ``path`` (and with ``tree`` everything below it), and the
        listing of its parent.

        Called by every operation that changed the upper, after the change.
        """
        if self.upper is not None:
            self.upper.forget_dirs(path, tree)
        with self._cache_lock:
            self._gen += 1
            self._cache.pop(path, None)
            self._drop_listing(path)
            self._drop_listing(split_path(path)[0])
            if tree:
                if path == "/":
                    self._cache.clear()
                    self._listings.clear()
                    self._listed = 0
                    return
                prefix = path + "/"
                for key in [k for k in self._cache if k.startswith(prefix)]:
                    del self._cache[key]
                for key in [k for k in self._listings if k.startswith(prefix)]:
                    self._drop_listing(key)

    def _drop_listing(self, path):
        """Forget the listing of ``path``. The caller holds the cache lock."""
        entries = self._listings.pop(path, None)
        if entries is not None:
            self._listed -= len(entries)
