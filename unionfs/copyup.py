"""Atomic copy-up (overlayfs's copy_up.c).

The first change to an entry that lives only in a lower layer copies it into
the upper: parents first (each with its own metadata), then the entry. The
copy is built under a temporary name in the work directory -- data, owner,
xattrs, mode, times, the inode number it shows (inodes.py), in that order --
fsync'ed, and renamed into place, so a
crash leaves either no upper entry (the lower still shows) or a complete one.
Leftover temporaries are removed when the next mount starts.

Callers hold the union's mutation lock, except that ``copy_up_file`` copies
a file's data without it (see there); lookups run concurrently and see the
lower entry until the rename publishes the copy.

Each published copy is reported to ``observer`` (see observe.py): what was
copied, how many bytes of data, how long it took.
"""

import errno
import itertools
import os
import stat
import _thread   # threading.Lock is _thread.allocate_lock: see layers.py
import time

from unionfs import inodes
from unionfs import metacopy
from unionfs import osutil
from unionfs import whiteout as wh
from unionfs.layers import DIR, child_path, split_path
from unionfs.observe import NO_OBSERVER

# ``data`` of a copy-up that copies metadata only (metacopy.py): the copy is
# a sparse file of the lower's size whose bytes still come from the lower.
META = "meta"

# A hard-link copy-up in progress: WORK/LINKS_INTENT + "LAYER.INO", holding
# "LAYER LOWER-INO PATH" (see CopyUp._copy_up_links).
LINKS_INTENT = "links."

_COPY_CHUNK = 1 << 20
_WRITEBACK_CHUNK = 8 << 20
_IS_ROOT = os.geteuid() == 0
# This process's id, for temporary names (a system call each time otherwise;
# kept right in a child forked after import).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))

# Errors that mean "this xattr cannot be copied here", not "copy-up failed":
# the upper's filesystem lacks the namespace (ENOTSUP), or the daemon lacks the
# privilege for it (EPERM, e.g. trusted.* when not root; EACCES, security.*).
_XATTR_SKIP = (errno.ENOTSUP, errno.EPERM, errno.EACCES)


def copy_xattrs(src_layer, src, dst_layer, dst, names=None):
    """Copy every non-private xattr of ``src`` (of ``src_layer``) to ``dst``
    (of ``dst_layer``), no symlink followed. ``names``: those of ``src`` if
    the caller knows them (a lower entry's, listed once per lookup)."""
    if names is None:
        try:
            names = src_layer.listxattr(src)
        except OSError as e:
            if e.errno in _XATTR_SKIP:
                return
            raise
    for name in names:
        if wh.is_private_xattr(name):
            continue
        try:
            dst_layer.setxattr(dst, name, src_layer.getxattr(src, name))
        except OSError as e:
            if e.errno not in _XATTR_SKIP and e.errno != errno.ENODATA:
                raise


def copy_data(fd_in, fd_out, size, durable=False):
    """Copy ``size`` bytes, keeping holes (a sparse lower stays sparse).

    ``durable``: the caller will fsync ``fd_out``; writeback of each chunk
    is started as soon as it is copied, so the disk writes while the copy
    goes on and the fsync only waits for the last chunk (measured: a
    512 MiB copy-up 0.26 s -> 0.17 s on ext4).
    """
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd_in, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # only a hole is left
                    break
                raise
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            _copy_range(fd_in, fd_out, start, min(end, size) - start, durable)
            off = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        # The lower's filesystem cannot report holes: copy everything.
        _copy_range(fd_in, fd_out, 0, size, durable)
    os.ftruncate(fd_out, size)


def _copy_range(fd_in, fd_out, off, count, durable=False):
    end = off + count
    step = _WRITEBACK_CHUNK if durable else 1 << 30
    try:
        while off < end:
            n = os.copy_file_range(fd_in, fd_out, min(end - off, step), off, off)
            if n == 0:
                return              # the source shrank under us: stop at EOF
            if durable:
                osutil.start_writeback(fd_out, off, n)
            off += n
        return
    except OSError as e:
        # Cross-device or unsupported: fall back to plain reads and writes.
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while off < end:
        buf = os.pread(fd_in, min(_COPY_CHUNK, end - off), off)
        if not buf:
            return
        written = 0
        while written < len(buf):
            written += os.pwrite(fd_out, buf[written:], off + written)
        off += len(buf)


def set_metadata(src_layer, src, dst_layer, dst, st, xattr_names=None):
    """Give ``dst`` (of ``dst_layer``) the owner, xattrs, mode and times of
    ``src`` (of ``src_layer``, stat ``st``; ``xattr_names``: as copy_xattrs).

    Order matters: chown clears set-id bits, so the mode comes after it.
    """
    if _IS_ROOT:
        dst_layer.chown(dst, st.st_uid, st.st_gid)
    copy_xattrs(src_layer, src, dst_layer, dst, xattr_names)
    if not stat.S_ISLNK(st.st_mode):
        # (``dst`` is a copy being made, not a symlink: nothing to follow.)
        dst_layer.chmod(dst, stat.S_IMODE(st.st_mode), follow_symlinks=True)
    dst_layer.utime(dst, (st.st_atime_ns, st.st_mtime_ns))


class CopyUp:
    """Copies entries from lower layers into the upper of ``stack``."""

    def __init__(self, stack, work, writer, fsync=True):
        self.stack = stack
        self.upper = stack.upper
        self.work = work            # private temp dir on the upper's filesystem (a Layer)
        self.writer = writer
        self.fsync = fsync
        self.on_publish = None      # called with each path a copy-up published
        self.observer = NO_OBSERVER
        self._seq = itertools.count()
        self._stripes = [_thread.allocate_lock() for _ in range(64)]

    def recover(self):
        """Clean the work dir after an earlier daemon: finish the hard-link
        copy-ups it left half done, remove its temporaries (never published)."""
        with self.work.scandir("/") as it:
            names = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
        for name, is_file in names:
            if name.startswith(LINKS_INTENT) and is_file:
                with os.fdopen(self.work.open("/" + name, os.O_RDONLY), "rb") as f:
                    fields = os.fsdecode(f.read()).split(" ", 2)
                # Cut short while being written: nothing was published yet.
                if len(fields) == 3:
                    index, ino, path = fields
                    self._finish_links(self.stack.layers[int(index)], int(ino), path)
            remove_tree(self.work, "/" + name)

    def _finish_links(self, layer, ino, path):
        """Link the names of lower inode ``ino`` (of ``layer``) still lower
        to its copy at ``path``, if that copy was published."""
        node = self.stack.lookup(path)
        if node is None or not node.in_upper or node.kind == DIR:
            return
        if inodes.recorded_ino(self.upper, path) != ino | layer.ino_tag:
            return
        for name in layer.names_of(ino):
            try:
                shown = self.stack.lookup(name)
            except OSError:
                continue
            if shown is not None and shown.kind != DIR and shown.top is layer:
                self.ensure_dir(split_path(name)[0])
                self._publish(lambda dst: self.upper.link(path, self.upper, dst),
                              name, linked=True)

    def temp_name(self):
        """A fresh name in the work dir, as a path of ``self.work`` (the pid
        keeps two daemons apart)."""
        return f"/#{_PID[0]:x}.{next(self._seq):x}"

    def ensure_dir(self, path):
        """Copy directory ``path`` (and its parents) up if needed; return its node."""
        node = self.stack.lookup(path)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if node.in_upper:
            return node
        return self.copy_up(path, node)

    def copy_up(self, path, node=None, data=True):
        """Make ``path`` an upper entry; return its new node.

        ``data=False`` copies no data (the caller truncates to 0 next);
        ``data=META`` makes a regular file a metacopy (metacopy.py).
        """
        if node is None:
            node = self.stack.lookup(path)
            if node is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if node.in_upper:
            return node
        parent, _ = split_path(path)
        st = node.top.lstat(path)
        if is_hard_link(st):
            return self._copy_up_links(path, node, st, data)
        self.ensure_dir(parent)
        t0 = time.perf_counter_ns()
        tmp, recorded = self._build_copy(st, data, node.top, path, xattr_names=node.xattrs)
        self._before_publish(path, st, data)
        self.publish(tmp, path)
        self._report(path, st, data, t0)
        return self._published(path, st, node.top, data, recorded)

    def _published(self, path, st, layer, data, recorded):
        """The node of the copy of ``path`` (of lower ``layer``, stat
        ``st``; not a hard link) just published, with what Union._learn
        would read back from its xattrs filled in if they were written
        (``recorded``): the inode number it shows, where its data is. A
        copy-up then costs no listxattr and getxattrs when next stat'ed."""
        node = self.stack.lookup(path)
        if recorded and node is not None and node.in_upper and node.ino is None:
            node.hidden_links = 0
            node.data = path if data is META and stat.S_ISREG(st.st_mode) else None
            # Last: a number says the rest is learned (Union.lstat and
            # lower_data read the node without a lock).
            node.ino = origin_ino(st, layer)
        return node

    def _report(self, path, st, data, t0):
        meta = data is META and stat.S_ISREG(st.st_mode)
        nbytes = st.st_size if data and not meta and stat.S_ISREG(st.st_mode) else 0
        self.observer.copied_up(path, nbytes, time.perf_counter_ns() - t0, meta=meta)

    def _before_publish(self, path, st, data):
        """A metacopy's parent is marked first (see metacopy.IMPURE_XATTRS)."""
        if data is META and stat.S_ISREG(st.st_mode):
            metacopy.mark_impure(self.upper, split_path(path)[0])

    def _copy_up_links(self, path, node, st, data):
        """Copy up a lower file that has several names (a hard link): one
        upper copy, linked at every name of it that the merged view shows,
        so all keep showing one file (overlayfs's index=on): one st_ino, the
        right st_nlink, a write through one seen through the others. The
        upper alone then says so -- a remount, kernel overlayfs, `diff` and
        `commit` read the same links.

        Each name is published by one link(2). A crash between two leaves
        some names copied and the others lower, all with the same bytes (the
        data only changes once the copy-up is done); the next copy-up of a
        remaining name links it to the copy found at a published name (the
        record names the lower inode), which mends the split.

        Never a metacopy: its data would have to follow every name."""
        layer = node.top
        data = True if data is META else data
        others, copy = self.other_names(path, node, st)
        lower_names = [path] + others
        # Names the merged view hides (another layer's entry, a whiteout)
        # cannot be linked, but still count in st_nlink, as on overlayfs.
        hidden = max(0, st.st_nlink - len(lower_names))
        # Until every name is linked, an intent in the work dir says which
        # copy is being linked, so that the next mount finishes the job if
        # this daemon dies first (``recover``): no name is ever left behind.
        intent = f"/{LINKS_INTENT}{layer.index}.{st.st_ino}"
        if copy is None:
            self.ensure_dir(split_path(path)[0])
            tmp = self._build_copy(st, data, layer, path, hidden)[0]
            self._write_intent(intent, f"{layer.index} {st.st_ino} {path}")
            self.publish(tmp, path, linked=True)
            copy = path
            lower_names.remove(path)
        else:
            self._write_intent(intent, f"{layer.index} {st.st_ino} {copy}")
        for name in lower_names:
            self.ensure_dir(split_path(name)[0])
            self._publish(lambda dst: self.upper.link(copy, self.upper, dst), name, linked=True)
        self.work.unlink(intent)
        return self.stack.lookup(path)

    def _write_intent(self, intent, text):
        fd = self.work.open(intent, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.fsencode(text))
        finally:
            os.close(fd)

    def copy_up_file(self, path, lock, data=True):
        """Copy up a non-directory, copying its data *outside* ``lock`` (the
        union's mutation lock), so a big copy-up does not hold up every other
        change. One copy-up per path at a time (a striped lock); the copy is
        published only if, under ``lock`` again, the path still shows the
        same lower entry -- otherwise (renamed, removed, copied up by a
        rename meanwhile) it is dropped. Returns the node.
        """
        with self._stripes[hash(path) % len(self._stripes)]:
            with lock:
                node = self.stack.lookup(path)
                if node is None:
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                if node.in_upper or node.kind == DIR:
                    return self.copy_up(path, node, data)
                st = node.top.lstat(path)
                if is_hard_link(st):
                    return self.copy_up(path, node, data)   # all names at once
                self.ensure_dir(split_path(path)[0])
            t0 = time.perf_counter_ns()
            tmp, recorded = self._build_copy(st, data, node.top, path, xattr_names=node.xattrs)
            with lock:
                now = self.stack.lookup(path)
                if now is None or now.in_upper or now.top is not node.top:
                    remove_tree(self.work, tmp)
                    if now is None:
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                    return self.copy_up(path, now, data)
                self._before_publish(path, st, data)
                self.publish(tmp, path)
                self._report(path, st, data, t0)
                return self._published(path, st, node.top, data, recorded)

    def other_names(self, path, node, st):
        """(lower names, copy) of hard link ``path`` (lower ``node``, ``st``):
        the other merged names that show the same lower file, and the merged
        path of a copy of it already published in the upper at another
        name, or None."""
        layer = node.top
        key = origin_ino(st, layer)
        lower_names, copy = [], None
        for other in layer.names_of(st.st_ino):
            if other == path:
                continue
            try:
                shown = self.stack.lookup(other)
            except OSError:         # ENOTDIR: hidden under a non-directory
                continue
            if shown is None or shown.kind == DIR:
                continue
            if shown.top is layer:
                lower_names.append(other)
            elif copy is None and shown.in_upper and \
                    inodes.recorded_ino(self.upper, other) == key:
                copy = other
        return lower_names, copy

    def publish(self, tmp, path, linked=False):
        """Rename work entry ``tmp`` to ``path`` in the upper."""
        try:
            self._publish(lambda dst: self.work.rename(tmp, self.upper, dst), path, linked)
        except BaseException:
            remove_tree(self.work, tmp)
            raise

    def _publish(self, put, path, linked=False):
        """``put(path)`` the copy of ``path`` into the upper, keeping the
        parent directory's times (as overlayfs does: a copy-up is not a
        change of the parent). ``linked``: the copy has other merged names."""
        parent = split_path(path)[0]
        pst = self.upper.lstat(parent)
        try:
            put(path)
        finally:
            self.stack.invalidate(path)
        self.upper.utime(parent, (pst.st_atime_ns, pst.st_mtime_ns))
        if self.on_publish is not None:
            self.on_publish(path, linked)

    def _build_copy(self, st, data, layer, path, hidden_links=0, xattr_names=None):
        """A copy of ``path`` of lower ``layer`` (stat ``st``; its xattr
        names if known) in the work dir; returns (its name there, whether
        its inode number is recorded)."""
        tmp = self.temp_name()
        work = self.work
        mode = st.st_mode
        ino = origin_ino(st, layer)
        try:
            if stat.S_ISREG(mode):
                return tmp, self._copy_file((layer, path), tmp, st, data,
                                            (ino, hidden_links), path, xattr_names=xattr_names)
            if stat.S_ISDIR(mode):
                work.mkdir(tmp, 0o700)
            elif stat.S_ISLNK(mode):
                work.symlink(layer.readlink(path), tmp)
            else:
                work.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            set_metadata(layer, path, work, tmp, st, xattr_names)
            recorded = inodes.record_ino(work, tmp, ino)
        except BaseException:
            remove_tree(work, tmp)
            raise
        return tmp, recorded

    def _copy_file(self, src, tmp, st, data, record, path, meta_src=None, xattr_names=None):
        """Build regular file ``tmp`` of the work dir: the data of ``src``
        ((layer, path)) as ``data`` says, the metadata of ``meta_src``
        (default ``src``; ``st`` is its stat), the inode record ``record``
        (inodes.recorded). Returns whether the record was written."""
        work = self.work
        # Only a copy of the data reads the lower file (a metacopy's stays).
        copying = bool(data) and data is not META
        fd_in = src[0].open(src[1], os.O_RDONLY) if copying else -1
        meta_src = src if meta_src is None else meta_src
        try:
            fd_out = work.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if data is META:
                    os.ftruncate(fd_out, st.st_size)
                elif copying:
                    copy_data(fd_in, fd_out, st.st_size, durable=self.fsync)
                set_metadata(*meta_src, work, tmp, st, xattr_names)
                if data is META:
                    # The record and the markers in one visit (a metacopy
                    # needs xattrs: no failure of the record is tolerated).
                    work.setxattrs(tmp, (inodes.record_item(*record),
                                         *metacopy.markers(path)))
                    recorded = True
                else:
                    recorded = inodes.record_ino(work, tmp, *record)
                # No data copied, nothing to make durable before the rename
                # (the journal orders metadata), as overlayfs skips its fsync.
                if data is not META and self.fsync:
                    os.fsync(fd_out)
            except BaseException:
                os.close(fd_out)
                work.unlink(tmp)
                raise
            os.close(fd_out)
        finally:
            if copying:
                os.close(fd_in)
        return recorded

    def complete(self, path, lock, locate, data=True):
        """Give metacopy ``path`` its data (``data=False``: none, the
        caller truncates to 0). ``locate(path, node)`` is the lower data file
        of an upper node ((layer, path)), or None once it has its own.

        The upper is replaced in one rename by a full copy (data from the
        lower, metadata, xattrs and inode number from the metacopy), built
        outside ``lock`` as copy_up_file does; it is published only if the
        metacopy did not change meanwhile (same inode, same ctime), else
        built again under the lock."""
        with self._stripes[hash(path) % len(self._stripes)]:
            for attempt in (1, 2):
                with lock:
                    node = self.stack.lookup(path)
                    if node is None:
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                    src = locate(path, node) if node.in_upper and node.kind != DIR else None
                    if src is None:
                        return node
                    st = self.upper.lstat(path)
                    if attempt == 2:
                        return self._complete(path, src, st, data)
                tmp = self._build_completion(path, src, st, data)
                with lock:
                    node = self.stack.lookup(path)
                    now = self.upper.lstat(path) if node is not None and node.in_upper else None
                    if now is not None and (now.st_ino, now.st_ctime_ns) == \
                            (st.st_ino, st.st_ctime_ns) and locate(path, node) == src:
                        self.publish(tmp, path)
                        return self.stack.lookup(path)
                    remove_tree(self.work, tmp)

    def _complete(self, path, src, st, data):
        self.publish(self._build_completion(path, src, st, data), path)
        return self.stack.lookup(path)

    def _build_completion(self, path, src, st, data):
        tmp = self.temp_name()
        ino, hidden = inodes.recorded(self.upper, path)
        self._copy_file(src, tmp, st, data, (st.st_ino if ino is None else ino, hidden), path,
                        meta_src=(self.upper, path))
        return tmp

    def copy_up_tree(self, path, listing, data=True):
        """Copy a whole merged directory into the upper and make it opaque.

        Used before a directory that lower layers contribute to is renamed:
        afterwards the upper directory alone holds the merged contents, so it
        can move anywhere (no redirect xattrs, no EXDEV). ``listing(path)``
        yields the merged (name, kind) entries of a directory; ``data`` is
        what to copy of each file (``META``: metadata only). Reported as one
        dir-copy (after the copy-ups of what it held).
        """
        t0 = time.perf_counter_ns()
        node, nbytes = self._copy_tree(path, listing, data)
        if nbytes is not None:
            self.observer.dir_copied(path, nbytes, time.perf_counter_ns() - t0)
        return node

    def _copy_tree(self, path, listing, data):
        """copy_up_tree's work: (node, data bytes copied), or (node, None)
        if the directory was upper-only (nothing to do)."""
        node = self.ensure_dir(path)
        if len(node.layers) == 1:
            return node, None       # upper-only: nothing below to copy
        nbytes = 0
        for name, kind in listing(path):
            child = path.rstrip("/") + "/" + name
            cnode = self.stack.lookup(child)
            if cnode is None:
                continue
            if kind == DIR:
                nbytes += self._copy_tree(child, listing, data)[1] or 0
            elif not cnode.in_upper:
                cst = cnode.top.lstat(child)
                self.copy_up(child, cnode, data)
                nbytes += cst.st_size if data is True and stat.S_ISREG(cst.st_mode) else 0
        upper = self.upper
        self.writer.set_opaque(upper, path)
        self.observer.opaque(path)
        # Opaque and complete, the directory needs no whiteouts any more; and
        # it must not keep them: kernel overlayfs lists a directory nothing
        # merges with straight from disk, whiteouts included.
        # Removing them is not a change the user made: keep the times.
        st = upper.lstat(path)
        with upper.scandir(path) as it:
            markers = [e.name for e in it
                       if (e.name.startswith(wh.WH_PREFIX) and e.name != wh.WH_OPAQUE)
                       or (not e.name.startswith(wh.WH_PREFIX)
                           and not e.is_dir(follow_symlinks=False)
                           and wh.is_whiteout_stat(e.stat(follow_symlinks=False)))]
        for name in markers:
            upper.unlink(child_path(path, name))
        if markers:
            upper.utime(path, (st.st_atime_ns, st.st_mtime_ns))
        self.stack.invalidate(path, tree=True)
        return self.stack.lookup(path), nbytes


def origin_ino(st, layer):
    """The inode number a copy of ``st`` (an entry of lower ``layer``) keeps
    showing: the one it showed there."""
    return st.st_ino | layer.ino_tag


def is_hard_link(st):
    """True for a non-directory with several names."""
    return st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode)


def remove_tree(layer, path):
    """Remove entry ``path`` of ``layer`` (a work-dir entry), of any type,
    best effort (cleanup path only). Iterative, relative to each directory:
    any depth works."""
    try:
        st = layer.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        layer.unlink(path)
        return
    # Depth first: a directory is removed once what it held is gone.
    todo = [(path, False)]
    while todo:
        p, listed = todo.pop()
        if listed:
            layer.rmdir(p)
            layer.forget_dirs(p)
            continue
        todo.append((p, True))
        with layer.scandir(p) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in entries:
            if is_dir:
                todo.append((child_path(p, name), False))
            else:
                layer.unlink(child_path(p, name))
