"""Operations that create, remove and rename names (overlayfs's dir.c).

Each function takes the ``Union`` and merged paths and runs under its
mutation lock. The rules (DESIGN.md §3):

- a new name over a whiteout replaces the whiteout (atomically: built in the
  work dir, then renamed or exchanged into place); a directory made there is
  opaque, so nothing of the deleted directory shows through;
- removing a name that a lower layer also has leaves a whiteout;
- rename copies the source up first (a directory with lower parts as a whole,
  made opaque), then moves it inside the upper: never EXDEV.

Every change ends with ``stack.invalidate`` for the paths it touched, and
each whiteout or opaque directory made is reported to ``u.copyup.observer``
(observe.py) once it is in place.
"""

import errno
import os
import stat

from unionfs import inodes
from unionfs import metacopy
from unionfs import whiteout as wh
from unionfs.copyup import META, is_hard_link, remove_tree, set_metadata
from unionfs.layers import DIR, NONDIR, WHITEOUT, Node, split_path
from unionfs.osutil import RENAME_EXCHANGE, RENAME_WHITEOUT
from unionfs.readdir import merged_entries

_IS_ROOT = os.geteuid() == 0
_DAEMON_OWNER = (os.geteuid(), os.getegid())


def _err(code, path=None):
    return OSError(code, os.strerror(code), path)


# The kernel's check before clearing privileges (a GETXATTR before the first
# write to a file and before each chown) asks for this name.
CAPABILITY_XATTR = "security.capability"


class _NewEntryXattrs:
    """The xattr names of an entry just made through the mount, as far as
    getxattr needs them (Union._xattr_names): not listed (an LSM's label or
    an inherited ACL may be there), but without security.capability (only
    a setxattr makes one, and the mount's start a new epoch) and without
    records of ours (Union._learn: it was not copied up)."""

    __slots__ = ()

    def __contains__(self, name):
        return name != CAPABILITY_XATTR


NEW_ENTRY_XATTRS = _NewEntryXattrs()


def check_name(name):
    """Names that cannot exist in the merged view: OCI markers are reserved
    (they would read back as whiteouts), and over-long names are refused
    before a marker for them could be."""
    if name.startswith(wh.WH_PREFIX):
        raise _err(errno.EINVAL, name)
    if len(os.fsencode(name)) > 255:
        raise _err(errno.ENAMETOOLONG, name)


def _set_owner(u, layer, path, owner, parent, is_dir):
    """Give new entry ``path`` of ``layer`` (the upper, or the work dir) the
    caller's uid/gid (set-gid parents keep their gid); ``parent``: the
    merged directory it is made for.

    Only a privileged daemon can; otherwise entries belong to the daemon's
    user, who is the only user of such a mount.
    """
    if owner is None or not _IS_ROOT or owner == _DAEMON_OWNER:
        return      # (the daemon's own: the filesystem already did it right)
    uid, gid = owner
    pst = u.upper.lstat(parent)
    if pst.st_mode & stat.S_ISGID:
        gid = pst.st_gid
    st = layer.lstat(path)
    layer.chown(path, uid, gid)
    # chown clears set-id bits of non-directories: put back what was asked.
    if not is_dir and not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        layer.chmod(path, stat.S_IMODE(st.st_mode))


def _new_entry(u, path, build, is_dir, owner, linked=False):
    """Create a new name at merged ``path`` with ``build(layer, path)``.

    ``build`` makes the entry at the path of the Layer it is given and
    returns what the caller wants back (an fd for create). Returns that value.
    ``linked``: the name is a new link to an existing file (which has its
    xattrs and records), not a new entry.
    """
    u.check_writable()
    epoch = u.xattr_epoch      # (before the entry exists: see _xattr_names)
    parent, name = split_path(path)
    check_name(name)
    with u.lock:
        if u.stack.lookup(path) is not None:
            raise _err(errno.EEXIST, path)
        pnode = u.copyup.ensure_dir(parent)
        if pnode.kind != DIR:
            raise _err(errno.ENOTDIR, path)
        upper = u.upper
        over_whiteout = u.stack.upper_whiteout(path)
        try:
            result = (_publish_over_whiteout if over_whiteout else _make_in_place)(
                u, path, build, is_dir, owner)
        except BaseException:
            u.stack.invalidate(path)
            raise
        # What lookup would find now is known: a new name stands in the upper
        # alone (a visible lower entry would have been EEXIST, and a whiteout
        # or an opaque parent hides whatever lower layers have), so record it
        # instead of paying for the lookup.
        u.stack.invalidate(path)
        node = Node(DIR if is_dir else NONDIR, (upper,))
        if not linked:
            node.xattrs = (epoch, NEW_ENTRY_XATTRS)
        u.stack.prime(path, node)
        return result


def _make_in_place(u, path, build, is_dir, owner):
    result = build(u.upper, path)
    _set_owner(u, u.upper, path, owner, split_path(path)[0], is_dir)
    return result


def _publish_over_whiteout(u, path, build, is_dir, owner):
    """Build the entry in the work dir, then replace the whiteout with it in
    one step (a directory made opaque first, so nothing below shows)."""
    parent, name = split_path(path)
    upper, work = u.upper, u.work
    tmp = u.copyup.temp_name()
    result = build(work, tmp)
    try:
        _set_owner(u, work, tmp, owner, parent, is_dir)
        if is_dir:
            u.writer.set_opaque(work, tmp)
        if upper.exists(path):
            # An overlay whiteout (0/0 device) holds the name.
            if is_dir:
                work.rename(tmp, upper, path, RENAME_EXCHANGE)
                work.unlink(tmp)
            else:
                work.rename(tmp, upper, path)
        else:
            # An OCI marker hides the name: publish, then drop it.
            work.rename(tmp, upper, path)
            upper.unlink(u.writer.marker_path(parent, name))
    except BaseException:
        remove_tree(work, tmp)
        if isinstance(result, int):
            os.close(result)        # create's descriptor: nobody will get it
        raise
    if is_dir:
        u.copyup.observer.opaque(path)
    return result


def create(u, path, mode, flags, owner):
    accmode = flags & os.O_ACCMODE
    keep = flags & (os.O_APPEND | os.O_SYNC | os.O_DSYNC)

    def build(layer, p):
        return layer.open(p, os.O_CREAT | os.O_EXCL | (accmode or os.O_RDONLY) | keep,
                          stat.S_IMODE(mode))
    return _new_entry(u, path, build, False, owner)


def mkdir(u, path, mode, owner):
    _new_entry(u, path, lambda layer, p: layer.mkdir(p, stat.S_IMODE(mode)), True, owner)


def mknod(u, path, mode, dev, owner):
    _new_entry(u, path, lambda layer, p: layer.mknod(p, mode, dev), False, owner)


def symlink(u, path, target, owner):
    _new_entry(u, path, lambda layer, p: layer.symlink(target, p), False, owner)


def link(u, existing, path):
    u.check_writable()
    with u.lock:
        node = u.node(existing)
        if node.kind == DIR:
            raise _err(errno.EPERM, existing)
        # With its data: a metacopy's data must not have to follow two names.
        upper = u.upper_for(existing)
        try:
            _new_entry(u, path, lambda layer, p: upper.link(existing, layer, p), False, None,
                       linked=True)
        finally:
            u.stack.invalidate(existing)


def _link_before_removal(u, path, node):
    """Before name ``path`` (a non-directory, ``node``) goes away: if it is
    one name of a lower hard link whose other names show, copy them all up
    (one upper file), so that they count this one down (st_nlink), as on
    overlayfs with index=on. Returns the node of ``path``."""
    if node.in_upper:
        return node
    st = node.top.lstat(path)
    if is_hard_link(st) and any(u.copyup.other_names(path, node, st)):
        return u.copyup.copy_up(path, node)
    return node


def _remove_whiteout_needed(u, path):
    """True if something below the upper would show at ``path`` once the
    upper entry is gone: then removal must leave a whiteout."""
    return u.stack.lookup_below(path) is not None


def _whiteout(u, path, is_dir):
    """Replace whatever the upper has at ``path`` (maybe nothing) by a
    whiteout, atomically where the format allows. (The caller reports it:
    a rename may take two steps to leave one.)"""
    parent, name = split_path(path)
    upper, work = u.upper, u.work
    existing = upper.exists(path)
    if u.writer.format == wh.FORMAT_OVERLAY:
        tmp = u.copyup.temp_name()
        u.writer.make_device_whiteout(work, tmp)
        try:
            if existing and is_dir:
                work.rename(tmp, upper, path, RENAME_EXCHANGE)  # tmp now holds the old dir
                upper.forget_dirs(path, tree=True)
            else:
                work.rename(tmp, upper, path)
        finally:
            remove_tree(work, tmp)
        return
    # OCI: the marker first, so the name is never visible-then-gone-then-back.
    u.writer.make_marker(upper, parent, name)
    if existing:
        _remove_upper(u, path, is_dir)


def _remove_upper(u, path, is_dir):
    """Remove ``path`` from the upper."""
    if is_dir:
        # Move it out of sight in one step, then empty it at leisure: it
        # holds only whiteouts and markers (the merged dir was empty).
        tmp = u.copyup.temp_name()
        u.upper.rename(path, u.work, tmp)
        u.upper.forget_dirs(path, tree=True)
        remove_tree(u.work, tmp)
    else:
        u.upper.unlink(path)


def unlink(u, path):
    u.check_writable()
    with u.lock:
        node = u.node(path)
        if node.kind == DIR:
            raise _err(errno.EISDIR, path)
        node = _link_before_removal(u, path, node)
        _remove(u, path, node, False)


def rmdir(u, path):
    u.check_writable()
    if path == "/":
        raise _err(errno.EBUSY, path)
    with u.lock:
        node = u.node(path)
        if node.kind != DIR:
            raise _err(errno.ENOTDIR, path)
        if merged_entries(path, node):
            raise _err(errno.ENOTEMPTY, path)
        _remove(u, path, node, True)


def _remove(u, path, node, is_dir):
    try:
        u.copyup.ensure_dir(split_path(path)[0])
        if _remove_whiteout_needed(u, path):
            _whiteout(u, path, is_dir and node.in_upper)
            u.copyup.observer.whiteout(path)
        else:
            _remove_upper(u, path, is_dir)
    finally:
        u.stack.invalidate(path, tree=is_dir)


def _listing(u):
    def listing(path):
        node = u.node(path)
        return [(name, DIR if stat.S_ISDIR(ftype) else "n")
                for name, ftype, _ in merged_entries(path, node)]
    return listing


def _data(u):
    """What a rename copies up of a lower file: its metadata only where
    metacopy is on (the copy records where its data stays)."""
    return META if u.metacopy else True


def rename(u, old, new, noreplace=False):
    """rename(2) on the merged view; ``noreplace``: renameat2's
    RENAME_NOREPLACE (EEXIST if ``new`` shows). RENAME_EXCHANGE is exchange()."""
    u.check_writable()
    if old == new:
        if noreplace:
            raise _err(errno.EEXIST, new)
        return
    if new.startswith(old + "/"):
        raise _err(errno.EINVAL, new)
    new_parent, new_name = split_path(new)
    check_name(new_name)
    with u.lock:
        src = u.node(old)
        dst = u.stack.lookup(new)
        if noreplace and dst is not None:
            raise _err(errno.EEXIST, new)
        if dst is not None:
            if dst.kind != DIR and src.kind != DIR:
                # (a hard link's other names count the target down)
                dst = _link_before_removal(u, new, dst)
                src = u.node(old)
            if src.kind == DIR and dst.kind != DIR:
                raise _err(errno.ENOTDIR, new)
            if src.kind != DIR and dst.kind == DIR:
                raise _err(errno.EISDIR, new)
            if dst.kind == DIR and merged_entries(new, dst):
                raise _err(errno.ENOTEMPTY, new)
            if src.kind != DIR and src.in_upper and dst.in_upper:
                a, b = u.upper.lstat(old), u.upper.lstat(new)
                if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                    return      # two links of one file: rename does nothing
        pnode = u.stack.lookup(new_parent)
        if pnode is None or pnode.kind != DIR:
            raise _err(errno.ENOENT if pnode is None else errno.ENOTDIR, new)
        try:
            _rename_locked(u, old, new, src)
        finally:
            u.stack.invalidate(old, tree=True)
            u.stack.invalidate(new, tree=True)


def _rename_locked(u, old, new, src):
    """The move itself, as close to one atomic step as the format allows:

    - ``overlay``: renameat2(RENAME_WHITEOUT) moves the entry and leaves the
      whiteout at the old name in one step; a directory target is first
      replaced by an empty opaque copy (its view does not change), so that
      rename(2) may replace it.
    - ``oci``: the marker for the old name is written before the move: until
      the move, the old entry still shows (an entry beats a marker of its own
      layer), after it the marker hides what lower layers have there.
    """
    upper = u.upper
    is_dir = src.kind == DIR
    if is_dir:
        u.copyup.copy_up_tree(old, _listing(u), _data(u))
    else:
        u.copyup.copy_up(old, src, _data(u))
    old_parent, old_name = split_path(old)
    new_parent, new_name = split_path(new)
    u.copyup.ensure_dir(new_parent)
    if not is_dir and u.lower_data(old, u.node(old)) is not None:
        metacopy.mark_impure(upper, new_parent)
    old_needs_whiteout = _remove_whiteout_needed(u, old)
    below_new = u.stack.lookup_below(new)
    # Lower layers have a directory at the target: the moved directory
    # must hide it, or its entries would merge into ours.
    opaque_new = is_dir and below_new is not None and below_new.kind == DIR \
        and not upper.is_opaque(old)
    if opaque_new:
        u.writer.set_opaque(upper, old)

    overlay = u.writer.format == wh.FORMAT_OVERLAY
    kind_new = upper.child_kind(new_parent, new_name)
    marker_new = None
    if kind_new == WHITEOUT and not upper.exists(new):
        marker_new = u.writer.marker_path(new_parent, new_name)
        kind_new = None
    if kind_new == DIR and overlay:
        _replace_with_empty_opaque(u, new)
        kind_new = None     # now truly empty: rename(2) can replace it
    if old_needs_whiteout and not overlay:
        u.writer.make_marker(upper, old_parent, old_name)

    if is_dir and kind_new in (WHITEOUT, DIR):
        # A directory onto a whiteout device, or onto an upper directory
        # rename(2) cannot replace: swap them, then deal with what is left.
        upper.rename(old, upper, new, RENAME_EXCHANGE)
        upper.forget_dirs(old, tree=True)
        upper.forget_dirs(new, tree=True)
        st = upper.lstat(old)
        if not (overlay and old_needs_whiteout and wh.is_whiteout_stat(st)):
            _remove_upper(u, old, stat.S_ISDIR(st.st_mode))
            if overlay and old_needs_whiteout:
                _whiteout(u, old, False)
    elif overlay and old_needs_whiteout:
        try:
            upper.rename(old, upper, new, RENAME_WHITEOUT)
        except OSError as e:
            # The upper's filesystem cannot: two steps (a crash between
            # them shows the entry under both names).
            if e.errno not in (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            upper.rename(old, upper, new)
            upper.forget_dirs(old, tree=True)
            _whiteout(u, old, False)
    else:
        upper.rename(old, upper, new)
    if marker_new is not None:
        upper.unlink(marker_new)
    if old_needs_whiteout:
        u.copyup.observer.whiteout(old)
    if opaque_new:
        u.copyup.observer.opaque(new)


def exchange(u, a, b):
    """renameat2(RENAME_EXCHANGE) on the merged view: ``a`` and ``b`` (both
    must show) swap places, atomically.

    Both are copied up first (a directory lower layers contribute to, whole
    and opaque, as for a rename), and a directory that will land where lower
    layers have a directory is made opaque (an upper-only directory has
    nothing below it at its old name, so that changes nothing yet). Then one
    renameat2(RENAME_EXCHANGE) in the upper swaps them.
    """
    u.check_writable()
    if a == b:
        return
    if b.startswith(a + "/") or a.startswith(b + "/"):
        raise _err(errno.EINVAL, b)
    with u.lock:
        nodes = {p: u.node(p) for p in (a, b)}
        if all(n.kind != DIR for n in nodes.values()) and all(
                n.in_upper for n in nodes.values()):
            sa, sb = u.upper.lstat(a), u.upper.lstat(b)
            if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
                return          # two links of one file: nothing to swap
        made_opaque = []        # where directories made opaque will land
        try:
            for p, node in nodes.items():
                if node.kind == DIR:
                    u.copyup.copy_up_tree(p, _listing(u), _data(u))
                else:
                    u.copyup.copy_up(p, node, _data(u))
            for p, there in ((a, b), (b, a)):
                if nodes[p].kind != DIR or u.upper.is_opaque(p):
                    continue
                below = u.stack.lookup_below(there)
                if below is not None and below.kind == DIR:
                    u.writer.set_opaque(u.upper, p)
                    made_opaque.append(there)
            for p, there in ((a, b), (b, a)):
                if nodes[p].kind != DIR and u.lower_data(p, u.node(p)) is not None:
                    metacopy.mark_impure(u.upper, split_path(there)[0])
            u.upper.rename(a, u.upper, b, RENAME_EXCHANGE)
            for p in made_opaque:
                u.copyup.observer.opaque(p)
        finally:
            u.stack.invalidate(a, tree=True)
            u.stack.invalidate(b, tree=True)


def _replace_with_empty_opaque(u, path):
    """Swap the upper directory at ``path`` (empty in the merged view, but
    holding whiteouts) for an empty opaque copy of it: the merged view does
    not change, and rename(2) can then replace it."""
    upper, work = u.upper, u.work
    st = upper.lstat(path)
    tmp = u.copyup.temp_name()
    work.mkdir(tmp, 0o700)
    try:
        set_metadata(upper, path, work, tmp, st)
        inodes.copy_record(upper, path, work, tmp)
        u.writer.set_opaque(work, tmp)
        work.rename(tmp, upper, path, RENAME_EXCHANGE)
        upper.forget_dirs(path, tree=True)
    finally:
        remove_tree(work, tmp)
