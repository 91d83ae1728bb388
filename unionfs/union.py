"""The union: layer stack + copy-up + whiteouts, as operations on merged paths.

Everything here is plain Python over directories (no FUSE): each method takes
merged paths, returns values, and raises ``OSError`` with the errno the caller
should see. ``fs.py`` maps FUSE calls onto these methods; ``namespace.py``
holds the operations that create, remove and rename names.

Locking: one re-entrant lock serialises every change to the upper (copy-ups
and namespace operations). Lookups, reads and writes through open files do
not take it.
"""

import errno
import os
import resource
import stat
import _thread   # threading.RLock is _thread.RLock: see layers.py

from unionfs import inodes
from unionfs import metacopy
from unionfs import namespace
from unionfs import whiteout as wh
from unionfs.copyup import META, CopyUp, is_hard_link
from unionfs.idmap import IdMap
from unionfs.layers import DIR, DIRFD_BUDGET, MIN_DIRFDS, Layer, LayerStack
from unionfs.readdir import merged_entries

# Our temporaries live in WORKDIR/WORK_SUBDIR: kernel overlayfs owns
# WORKDIR/work and WORKDIR/index, so the same workdir serves both.
WORK_SUBDIR = "unionfs-work"

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# Flags passed through to the backing open(); everything else (O_CREAT,
# O_EXCL: handled by create(); O_DIRECT: our buffers are not aligned;
# O_NOCTTY, O_NONBLOCK on regular files: meaningless) is dropped.
_OPEN_PASS = os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_NOATIME


def _err(code, path=None):
    return OSError(code, os.strerror(code), path)


class Union:
    """A mounted union of ``lowerdirs`` (top first) under ``upperdir``.

    ``ids``: the uid/gid mapping (idmap.py). Stat results stay as stored;
    ``ids`` (None without a mapping) says how to show them, and ids given
    to the methods here are as the mount shows them.

    ``metacopy``: attribute changes of a lower file copy up its metadata
    only (metacopy.py); its data is read from the lower until the first
    open for writing or truncate.
    """

    def __init__(self, lowerdirs, upperdir=None, workdir=None,
                 whiteout=wh.FORMAT_AUTO, fsync=True, ids=None, metacopy=False):
        top = upperdir if upperdir is not None else lowerdirs[0]
        top_dev = os.stat(top).st_dev
        lowers = []
        for i, d in enumerate(lowerdirs):
            tag = inodes.layer_tag(i, os.stat(d).st_dev == top_dev)
            lowers.append(Layer(d, i + 1, upper=False, ino_tag=tag))
        upper = Layer(upperdir, 0, upper=True) if upperdir is not None else None
        self.stack = LayerStack(upper, lowers)
        _share_dirfds(self.stack.layers)
        # The lowers alone, where a metacopy's data is looked up by path.
        self.lower_stack = LayerStack(None, lowers)
        self.metacopy = metacopy
        self.upper = upper
        self.readonly = upper is None
        self.ids = ids if ids is not None and ids.active else None
        self.lock = _thread.RLock()
        # Counts changes of upper xattrs made through the mount (see
        # _xattr_names): an upper entry's cached names are of one epoch.
        self.xattr_epoch = 0
        self.work = None
        self.copyup = None
        self.writer = None
        if upper is not None:
            self.work = self._prepare_work(os.path.join(workdir, WORK_SUBDIR))
            if whiteout == wh.FORMAT_AUTO:
                whiteout = (wh.FORMAT_OVERLAY if wh.can_write_overlay_whiteouts(self.work)
                            else wh.FORMAT_OCI)
            self.writer = wh.Writer(whiteout)
            self.copyup = CopyUp(self.stack, self.work, self.writer, fsync=fsync)
            self.copyup.recover()

    @staticmethod
    def _prepare_work(work):
        """Create the work dir; return it as a Layer (its temporaries are
        reached relative to it, as the upper's entries). What an earlier
        daemon left in it is dealt with by ``CopyUp.recover`` once the
        union is set up."""
        try:
            os.mkdir(work, 0o700)
        except FileExistsError:
            # Never follow a symlink here: everything inside is deleted.
            if not stat.S_ISDIR(os.lstat(work).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory (a symlink?)", work)
        # (follow_root=False: a symlink put there since is refused too.)
        layer = Layer(work, -1, upper=True, follow_root=False)
        layer.max_dirfds = MIN_DIRFDS      # only short-lived temporaries below it
        return layer

    # -- lookup ---------------------------------------------------------------

    def node(self, path):
        node = self.stack.lookup(path)
        if node is None:
            raise _err(errno.ENOENT, path)
        return node

    def check_writable(self):
        if self.readonly:
            raise _err(errno.EROFS)

    def lstat(self, path):
        """(stat_result, inode number, link count) of merged ``path``."""
        st, ino, _, nlink = self.lstat_layer(path)
        return st, ino, nlink

    def lstat_layer(self, path):
        """(stat_result, inode number, layer it comes from, link count) of
        ``path``. The link count of a directory that several layers
        contribute to is unknown (1, as overlayfs reports); a copied-up hard
        link adds the names the merged view hides (inodes.recorded).
        The inode number is the one the entry keeps for life (inodes.py):
        learned once per cached lookup, so a stat costs one lstat."""
        node = self.node(path)
        layer = node.layers[0]
        st = layer.lstat(path)
        if node.ino is None:
            self._learn(path, node, st)
        if len(node.layers) > 1:
            return st, node.ino, layer, 1
        return st, node.ino, layer, st.st_nlink + node.hidden_links

    def _learn(self, path, node, st):
        """Fill in ``node.ino`` and ``node.data`` (where its bytes are:
        None for its own, else the merged path of a metacopy's lower data):
        one listxattr tells an upper entry's records."""
        if node.in_upper:
            upper = node.top
            if node.xattrs is not None and node.xattrs[1] is namespace.NEW_ENTRY_XATTRS:
                node.ino = st.st_ino    # made here: no records to read
                return
            epoch = self.xattr_epoch
            try:
                names = upper.listxattr(path)
            except OSError:     # ENOTSUP: no xattrs, so no records either
                names = ()
            # Kept for getxattr (_xattr_names): the first GETXATTR of a new
            # file (the kernel's security.capability check) needs no call.
            node.xattrs = (epoch, frozenset(names))
            ino, node.hidden_links = (inodes.recorded(upper, path) if inodes.ORIGIN in names
                                      else (None, 0))
            if names and node.kind != DIR:
                node.data = metacopy.data_path(lambda name: upper.getxattr(path, name),
                                               path, names)
            node.ino = st.st_ino if ino is None else ino
        else:
            node.ino = st.st_ino | node.top.ino_tag

    def lower_data(self, path, node):
        """(lower layer, merged path) of the file holding the data of upper
        metacopy ``node`` at ``path``; None if it holds its own data."""
        if not node.in_upper or node.kind == DIR:
            return None
        if node.ino is None:
            self._learn(path, node, node.top.lstat(path))
        if node.data is None:
            return None
        lower = self.lower_stack.lookup(node.data)
        if lower is None or lower.kind == DIR:
            raise OSError(errno.EIO, "metacopy without its lower data", path)
        return lower.top, node.data

    def listdir(self, path):
        node = self.node(path)
        if node.kind != DIR:
            raise _err(errno.ENOTDIR, path)
        return self.stack.listing(path, node, merged_entries)

    def readlink(self, path):
        node = self.node(path)
        return node.top.readlink(path)

    def statfs(self):
        top = self.upper if self.upper is not None else self.stack.layers[0]
        return top.statvfs()

    # -- copy-up --------------------------------------------------------------

    def upper_for(self, path, data=True):
        """Copy ``path`` up if needed; return the upper Layer, where
        ``path`` now is (``upper_for(p).chmod(p, mode)``).

        ``data``: what the caller needs of the data: all of it (True), none
        (False: it truncates to 0 next), or only the metadata (``META``,
        attribute changes: with metacopy on, the data may stay below)."""
        self.check_writable()
        node = self.node(path)
        if data is META and not self.metacopy:
            data = True
        if not node.in_upper:
            if node.kind == DIR:
                with self.lock:
                    self.copyup.copy_up(path, node)
            else:
                self.copyup.copy_up_file(path, self.lock, data=data)
        elif data is not META and self.lower_data(path, node) is not None:
            self.copyup.complete(path, self.lock, self.lower_data, data=data)
        return self.upper

    def descriptors(self):
        """The numbers of the descriptors this union holds open (its layers'
        directories), for a daemon forked after it was set up."""
        layers = list(self.stack.layers) + ([self.work] if self.work is not None else [])
        return {fd for layer in layers for fd in layer.descriptors()}

    def settled(self, path, meta=False):
        """True if changing ``path`` needs no copy-up of data, so it is
        quick (a missing path, or one that fails, fails quickly too).

        ``meta``: the change is of attributes only (chmod, chown, utimes,
        xattrs). Those copy up metadata alone from a directory, a symlink
        or a device, and with metacopy on from a regular file too, unless
        it is a hard link (copied up whole: see CopyUp._copy_up_links)."""
        try:
            node = self.stack.lookup(path)
            if node is None:
                return True
            if node.in_upper:
                return meta or (len(node.layers) == 1 and self.lower_data(path, node) is None)
            if not meta:
                return False
            if node.kind == DIR:
                return True
            st = node.top.lstat(path)
            return not stat.S_ISREG(st.st_mode) or (self.metacopy and not is_hard_link(st))
        except OSError:
            return True

    # -- files ----------------------------------------------------------------

    def open(self, path, flags):
        """Open ``path``; return the fd. Writers get an upper copy."""
        backing = flags & _OPEN_PASS
        if flags & _WRITE_FLAGS:
            truncating = bool(flags & os.O_TRUNC)
            layer = self.upper_for(path, data=not truncating)
            if truncating:
                backing |= os.O_TRUNC
        else:
            node = self.node(path)
            layer, path = self.lower_data(path, node) or (node.top, path)
        return layer.open(path, backing)

    def truncate(self, path, length):
        # (Only regular files get here: the kernel refuses truncate(2) of
        # others. O_NONBLOCK all the same: an open never waits on a FIFO.)
        fd = self.upper_for(path, data=length > 0).open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    # -- attributes -------------------------------------------------------------

    def chmod(self, path, mode):
        self.upper_for(path, META).chmod(path, stat.S_IMODE(mode))

    def chown(self, path, uid, gid, st=None):
        """``st``: the stat of ``path`` if the caller has just read it (its
        mode is all that is used: a copy-up keeps it), to save an lstat."""
        if self.ids is not None:
            uid, gid = self.ids.stored_uid(uid), self.ids.stored_gid(gid)
        upper = self.upper_for(path, META)
        if st is None:
            st = upper.lstat(path)
        upper.chown(path, uid, gid)
        # chown of a non-directory clears set-id bits when the caller is not
        # privileged; the daemon is, so the kernel won't: do it as it would.
        if not stat.S_ISDIR(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            new = upper.lstat(path)
            keep = stat.S_IMODE(new.st_mode)
            if keep != stat.S_IMODE(st.st_mode):
                return          # the kernel already cleared them
            keep &= ~stat.S_ISUID
            if st.st_mode & stat.S_IXGRP:
                keep &= ~stat.S_ISGID
            if not stat.S_ISLNK(st.st_mode):
                upper.chmod(path, keep)

    def utimens(self, path, atime_ns, mtime_ns):
        """Set times; ``None`` for either means "leave it" (UTIME_OMIT)."""
        self.upper_for(path, META).utimes_ns(path, atime_ns, mtime_ns)

    # -- xattrs ---------------------------------------------------------------

    def getxattr(self, path, name):
        value = self.xattr(path, name)
        if value is None:
            raise _err(errno.ENODATA, path)
        return value

    def xattr(self, path, name):
        """getxattr's value, or None where the entry is known to lack
        ``name`` without asking the layer (a private name, the entry's
        listed names: see _xattr_names): most requests of `ls -l` end
        here, and the FUSE adapter answers them without raising ENODATA
        through its calls."""
        if wh.is_private_xattr(name):
            return None
        node = self.node(path)
        names = self._xattr_names(path, node)
        if names is not None and name not in names:
            return None
        return node.top.getxattr(path, name)

    def listxattr(self, path):
        node = self.node(path)
        names = node.top.listxattr(path) if node.in_upper else self._xattr_names(path, node)
        return [n for n in names if not wh.is_private_xattr(n)]

    def _xattr_names(self, path, node):
        """The xattr names of ``node`` (None: not known now), listed once
        per cached lookup: most getxattr requests (security.selinux and the
        ACLs of every file `ls -l` shows, security.capability before each
        write and chown) ask for names an entry does not have, and are then
        answered without a syscall.

        A lower entry's names never change (a copy-up gives the path a new
        node). An upper entry's may: they are kept (listed by _learn) with
        the epoch they were listed in, and every setxattr/removexattr
        through the mount starts a new one (another name of a hard link may
        have changed); in a later epoch they are not known, and a getxattr
        answers (a new listing would cost as much). What changes them
        otherwise only removes names (the kernel drops security.capability
        on a write or chown of the upper file): a name kept that is gone
        costs a real getxattr, which says ENODATA."""
        names = node.xattrs
        if not node.in_upper:
            if names is None:
                names = node.xattrs = frozenset(node.top.listxattr(path))
            return names
        if names is None or names[0] != self.xattr_epoch:
            return None
        return names[1]

    def setxattr(self, path, name, value, flags):
        if wh.is_private_xattr(name):
            raise _err(errno.EPERM, path)
        try:
            self.upper_for(path, META).setxattr(path, name, value, flags)
        finally:
            self.xattr_epoch += 1

    def removexattr(self, path, name):
        if wh.is_private_xattr(name):
            raise _err(errno.ENODATA, path)
        self.check_writable()
        node = self.node(path)
        # Removing what is not there must not cost a copy-up.
        node.top.getxattr(path, name)
        try:
            self.upper_for(path, META).removexattr(path, name)
        finally:
            self.xattr_epoch += 1

    # -- namespace (see namespace.py) --------------------------------------------

    def _stored(self, owner):
        return owner if owner is None or self.ids is None else self.ids.stored_owner(owner)

    def create(self, path, mode, flags, owner=None):
        return namespace.create(self, path, mode, flags, self._stored(owner))

    def mkdir(self, path, mode, owner=None):
        namespace.mkdir(self, path, mode, self._stored(owner))

    def mknod(self, path, mode, dev, owner=None):
        namespace.mknod(self, path, mode, dev, self._stored(owner))

    def symlink(self, path, target, owner=None):
        namespace.symlink(self, path, target, self._stored(owner))

    def link(self, existing, path):
        namespace.link(self, existing, path)

    def unlink(self, path):
        namespace.unlink(self, path)

    def rmdir(self, path):
        namespace.rmdir(self, path)

    def rename(self, old, new, noreplace=False):
        namespace.rename(self, old, new, noreplace)

    def exchange(self, a, b):
        namespace.exchange(self, a, b)


def _share_dirfds(layers):
    """Share the budget of cached directory descriptors among ``layers``,
    and let the process hold them (beside its open files): raise the soft
    limit on descriptors to the hard one."""
    each = max(MIN_DIRFDS, DIRFD_BUDGET // max(1, len(layers)))
    for layer in layers:
        layer.max_dirfds = each
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass        # kept as it is: the caches still fit in most limits
