"""The layer stack and path lookup (overlayfs's namei.c).

A *merged path* is an absolute path in the mounted view ("/", "/etc/passwd").
Every layer maps it to a backing path by prefixing the layer's root; because
lookup walks one component at a time and only descends into components that
are real directories in that layer, a symlink inside a layer is never
followed while resolving a path (``root + path`` only ever crosses
directories already seen as directories).

Invariants the caches rely on:
- lower layers never change while mounted (documented as undefined), so what
  a lower directory holds is read once (``DirIndex``) and kept;
- the upper is changed only by this daemon, and every change calls
  ``LayerStack.invalidate`` for the paths it touched, after touching them.
"""

import errno
import os
import stat
import threading

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


def child_path(parent, name):
    return "/" + name if parent == "/" else parent + "/" + name


def split_path(path):
    """'/a/b' -> ('/a', 'b'); '/a' -> ('/', 'a')."""
    parent, _, name = path.rpartition("/")
    return (parent or "/"), name


class DirIndex:
    """What one directory of an immutable lower layer holds, read once."""

    __slots__ = ("kinds", "opaque")

    def __init__(self, kinds, opaque):
        self.kinds = kinds      # name -> DIR | NONDIR | WHITEOUT
        self.opaque = opaque


class IndexBudget:
    """The names the DirIndex caches of a stack's lower layers hold, shared
    by all of them: 128 layers of 5,000 files each must not hold 128 times
    what one layer may."""

    __slots__ = ("layers", "used")

    def __init__(self, layers):
        self.layers = layers
        self.used = 0

    def clear(self):
        for layer in self.layers:
            layer._dirs.clear()     # read again when asked: lowers never change
        self.used = 0


class Layer:
    """One backing directory of the stack. All reads of a layer go through here.

    ``index`` is the position in the stack (0 = top-most). ``ino_tag`` is or'ed
    into the inode numbers of this layer's entries (see inodes.py).
    """

    def __init__(self, root, index, upper=False, ino_tag=0):
        self.root = os.path.abspath(root).rstrip("/")
        self.index = index
        self.upper = upper
        self.ino_tag = ino_tag
        self._dirs = {}         # lower layers only: merged dir path -> DirIndex
        self._budget = IndexBudget([self])  # shared with the stack's other lowers
        self._links = None      # lower layers only: inode -> its names (names_of)
        self.alone = (self,)    # the ``layers`` of a Node this layer alone makes

    def __repr__(self):
        return f"Layer({self.root!r}, {'upper' if self.upper else 'lower'} #{self.index})"

    def real(self, path):
        """Backing path of merged ``path`` in this layer (see module doc)."""
        return self.root + path if path != "/" else self.root + "/"

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
                    it = os.scandir(self.real(d))
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

    def child_kind(self, parent, name):
        """Kind of ``name`` inside directory ``parent`` of this layer, or None."""
        if not self.upper:
            idx = self._dirs.get(parent)
            if idx is None:
                idx = self._load(parent)
            return idx.kinds.get(name)
        path = self.root + child_path(parent, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            prefix = self.root + parent if parent != "/" else self.root
            if os.path.lexists(prefix + "/" + wh.WH_PREFIX + name):
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
                return idx.opaque
        real = self.real(path)
        return wh.has_opaque_xattr(real) or os.path.lexists(
            os.path.join(real, wh.WH_OPAQUE))

    def _load(self, path):
        """Read lower directory ``path`` once: its entries, whiteouts, opacity."""
        kinds = {}
        hidden = []
        opaque = False
        real = self.real(path)
        try:
            it = os.scandir(real)
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
                    elif e.is_file(follow_symlinks=False) or e.is_symlink():
                        kinds[name] = NONDIR
                    else:
                        st = e.stat(follow_symlinks=False)
                        kinds[name] = WHITEOUT if wh.is_whiteout_stat(st) else NONDIR
            opaque = opaque or wh.has_opaque_xattr(real)
        for name in hidden:
            # An entry present in the same layer as its marker stays visible.
            kinds.setdefault(name, WHITEOUT)
        idx = DirIndex(kinds, opaque)
        budget = self._budget
        if budget.used + len(kinds) > MAX_INDEXED_NAMES:
            budget.clear()
        self._dirs[path] = idx
        budget.used += len(kinds)
        return idx


class Node:
    """The result of a merged lookup.

    ``layers`` holds the layers that contribute, top-most first: for a
    directory every layer where it is a directory down to the first opaque
    one; for anything else exactly one layer. ``ino``: the inode number it
    shows, once known; ``data``: see ``Union._learn``.
    """

    __slots__ = ("kind", "layers", "ino", "data", "hidden_links")

    def __init__(self, kind, layers):
        self.kind = kind
        self.layers = layers
        self.ino = None
        self.data = None    # a metacopy's lower data path (Union._learn)
        self.hidden_links = 0

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
        self._cache_lock = threading.Lock()

    # -- lookup -------------------------------------------------------------

    def lookup(self, path):
        """Resolve merged ``path`` to a Node, or None if it does not exist.

        Raises ENOTDIR if a component before the last is not a directory.
        Lock-free: a result computed while the upper changed is not cached
        (the generation check), so the cache never holds a stale answer.
        """
        node = self._cache.get(path, _MISS)
        if node is not _MISS:
            return node
        gen = self._gen
        if path == "/":
            node = self._lookup_in("/", None, self.layers, root=True)
        else:
            parent_path, name = split_path(path)
            parent = self._lookup_walk(parent_path)
            if parent is None:
                return None
            if parent.kind != DIR:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            node = self._lookup_in(parent_path, name, parent.layers)
        self._store(gen, path, node)
        return node

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
                kind = DIR if os.path.isdir(layer.root + "/") else None
            else:
                kind = layer.child_kind(parent, name)
            if kind is None:
                continue
            if kind == WHITEOUT:
                break
            if kind == DIR:
                dirs.append(layer)
                if layer.is_opaque(path):
                    break
                continue
            if dirs:
                break       # a directory above hides a non-directory below
            return Node(NONDIR, layer.alone)
        return Node(DIR, tuple(dirs)) if dirs else None

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
