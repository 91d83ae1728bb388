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
import stat
import threading

from unionfs import inodes
from unionfs import namespace
from unionfs import whiteout as wh
from unionfs.copyup import CopyUp
from unionfs.idmap import IdMap
from unionfs.layers import DIR, Layer, LayerStack
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
    """

    def __init__(self, lowerdirs, upperdir=None, workdir=None,
                 whiteout=wh.FORMAT_AUTO, fsync=True, ids=None):
        top = upperdir if upperdir is not None else lowerdirs[0]
        top_dev = os.stat(top).st_dev
        lowers = []
        for i, d in enumerate(lowerdirs):
            tag = inodes.layer_tag(i, os.stat(d).st_dev == top_dev)
            lowers.append(Layer(d, i + 1, upper=False, ino_tag=tag))
        upper = Layer(upperdir, 0, upper=True) if upperdir is not None else None
        self.stack = LayerStack(upper, lowers)
        self.upper = upper
        self.readonly = upper is None
        self.ids = ids if ids is not None and ids.active else None
        self.lock = threading.RLock()
        self.work = None
        self.copyup = None
        self.writer = None
        if upper is not None:
            self.work = os.path.join(workdir, WORK_SUBDIR)
            self._prepare_work()
            if whiteout == wh.FORMAT_AUTO:
                whiteout = (wh.FORMAT_OVERLAY if wh.can_write_overlay_whiteouts(self.work)
                            else wh.FORMAT_OCI)
            self.writer = wh.Writer(whiteout)
            self.copyup = CopyUp(self.stack, self.work, self.writer, fsync=fsync)
            self.copyup.recover()

    def _prepare_work(self):
        """Create the work dir. What an earlier daemon left in it is dealt
        with by ``CopyUp.recover`` once the union is set up."""
        try:
            os.mkdir(self.work, 0o700)
        except FileExistsError:
            # Never follow a symlink here: everything inside is deleted.
            if not stat.S_ISDIR(os.lstat(self.work).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory (a symlink?)", self.work)

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
        """(stat_result, inode number, merged) of merged ``path``."""
        st, ino, _, merged = self.lstat_layer(path)
        return st, ino, merged

    def lstat_layer(self, path):
        """(stat_result, inode number, layer it comes from, merged) of ``path``;
        ``merged`` is True for a directory that several layers contribute to,
        whose link count is unknown (reported as 1, as overlayfs does).
        The inode number is the one the entry keeps for life (inodes.py):
        learned once per cached lookup, so a stat costs one lstat."""
        node = self.node(path)
        layer = node.layers[0]
        real = layer.real(path)
        st = os.lstat(real)
        ino = node.ino
        if ino is None:
            ino = inodes.recorded_ino(real) if layer.upper else None
            ino = node.ino = st.st_ino | layer.ino_tag if ino is None else ino
        return st, ino, layer, len(node.layers) > 1

    def listdir(self, path):
        node = self.node(path)
        if node.kind != DIR:
            raise _err(errno.ENOTDIR, path)
        return self.stack.listing(path, node, merged_entries)

    def readlink(self, path):
        node = self.node(path)
        return os.readlink(node.top.real(path))

    def statfs(self):
        top = self.upper if self.upper is not None else self.stack.layers[0]
        return os.statvfs(top.real("/"))

    # -- copy-up --------------------------------------------------------------

    def upper_path(self, path, data=True):
        """Copy ``path`` up if needed; return its backing path in the upper."""
        self.check_writable()
        node = self.node(path)
        if not node.in_upper:
            if node.kind == DIR:
                with self.lock:
                    self.copyup.copy_up(path, node)
            else:
                self.copyup.copy_up_file(path, self.lock, data=data)
        return self.upper.real(path)

    # -- files ----------------------------------------------------------------

    def open(self, path, flags):
        """Open ``path``; return the fd. Writers get an upper copy."""
        backing = flags & _OPEN_PASS
        if flags & _WRITE_FLAGS:
            truncating = bool(flags & os.O_TRUNC)
            real = self.upper_path(path, data=not truncating)
            if truncating:
                backing |= os.O_TRUNC
        else:
            real = self.node(path).top.real(path)
        return os.open(real, backing | os.O_NOFOLLOW | os.O_CLOEXEC)

    def truncate(self, path, length):
        os.truncate(self.upper_path(path, data=length > 0), length)

    # -- attributes -------------------------------------------------------------

    def chmod(self, path, mode):
        os.chmod(self.upper_path(path), stat.S_IMODE(mode), follow_symlinks=False)

    def chown(self, path, uid, gid):
        if self.ids is not None:
            uid, gid = self.ids.stored_uid(uid), self.ids.stored_gid(gid)
        real = self.upper_path(path)
        st = os.lstat(real)
        os.chown(real, uid, gid, follow_symlinks=False)
        # chown of a non-directory clears set-id bits when the caller is not
        # privileged; the daemon is, so the kernel won't: do it as it would.
        if not stat.S_ISDIR(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            new = os.lstat(real)
            keep = stat.S_IMODE(new.st_mode)
            if keep != stat.S_IMODE(st.st_mode):
                return          # the kernel already cleared them
            keep &= ~stat.S_ISUID
            if st.st_mode & stat.S_IXGRP:
                keep &= ~stat.S_ISGID
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(real, keep)

    def utimens(self, path, atime_ns, mtime_ns):
        """Set times; ``None`` for either means "leave it" (UTIME_OMIT)."""
        real = self.upper_path(path)
        if atime_ns is None or mtime_ns is None:
            st = os.lstat(real)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(real, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    # -- xattrs ---------------------------------------------------------------

    def getxattr(self, path, name):
        if wh.is_private_xattr(name):
            raise _err(errno.ENODATA, path)
        node = self.node(path)
        return os.getxattr(node.top.real(path), name, follow_symlinks=False)

    def listxattr(self, path):
        node = self.node(path)
        names = os.listxattr(node.top.real(path), follow_symlinks=False)
        return [n for n in names if not wh.is_private_xattr(n)]

    def setxattr(self, path, name, value, flags):
        if wh.is_private_xattr(name):
            raise _err(errno.EPERM, path)
        os.setxattr(self.upper_path(path), name, value, flags, follow_symlinks=False)

    def removexattr(self, path, name):
        if wh.is_private_xattr(name):
            raise _err(errno.ENODATA, path)
        self.check_writable()
        node = self.node(path)
        # Removing what is not there must not cost a copy-up.
        os.getxattr(node.top.real(path), name, follow_symlinks=False)
        os.removexattr(self.upper_path(path), name, follow_symlinks=False)

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
