"""Inode numbers of the merged view (overlayfs's xino and origin ideas).

Every entry shows one ``st_ino`` for its whole life: before and after its
copy-up, after renames, across unmount and remount; and no two entries of
the mount show the same number.

- A lower entry shows its backing inode number, with its layer's *tag* in the
  high bits when the layer lives on another filesystem than the top layer
  (``xino``): two filesystems may both have an inode 12, the tags keep them
  apart. A tag is ``(layer index + 1) << TAG_SHIFT``; backing inode numbers
  are assumed below ``2**TAG_SHIFT`` (ext4, xfs, btrfs and tmpfs hand out far
  smaller ones), as overlayfs assumes they leave its xino bits free.
- An entry made in the upper shows the upper's inode number (tag 0: the
  upper is the top layer).
- A copy-up records the number the entry showed until then in the upper copy
  (the ``ORIGIN`` xattr, overlayfs's ``origin``), and the copy shows that
  number from then on. It stays unique: the lower inode it names is never
  removed (lowers are immutable), so neither the upper filesystem nor a
  lower one can hand the number out again.

The xattr lives in overlayfs's private namespace (hidden from the merged view
here and by kernel overlayfs, which ignores names it does not know), so an
upper that carries it stays mountable by kernel overlayfs.
"""

import errno
import os

TAG_SHIFT = 56
# The number a copied-up entry shows, as decimal ASCII. trusted.* needs
# CAP_SYS_ADMIN; an unprivileged daemon uses the user.* form (which Linux
# refuses on symlinks and device nodes: those keep the upper's number).
ORIGIN_XATTRS = ("trusted.overlay.unionfs.ino", "user.overlay.unionfs.ino")


def layer_tag(index, same_fs_as_top):
    """The high bits or'ed into inode numbers of layer ``index``."""
    return 0 if same_fs_as_top else (index + 1) << TAG_SHIFT


def origin_xattr():
    """The origin xattr this daemon reads and writes."""
    return ORIGIN_XATTRS[0] if os.geteuid() == 0 else ORIGIN_XATTRS[1]


ORIGIN = origin_xattr()


def recorded(layer, path):
    """(inode number, hidden links) recorded on entry ``path`` of ``layer``
    (the upper, or the work dir) by its
    copy-up, or (None, 0) (made in the upper, or the record is unreadable).
    Hidden links: names of a lower hard link that its copy-up could not
    link because the merged view did not show them; they still count in
    st_nlink, as on overlayfs."""
    try:
        fields = layer.getxattr(path, ORIGIN).split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else 0)
    except OSError:
        # ENODATA: not copied up; ENOTSUP/EPERM: no record possible here.
        return None, 0
    except (ValueError, IndexError):
        return None, 0  # not written by us: ignore it


def recorded_ino(layer, path):
    return recorded(layer, path)[0]


def record_item(ino, hidden_links=0):
    """The (xattr name, value) that records ``ino`` (see record_ino)."""
    return ORIGIN, (f"{ino} {hidden_links}" if hidden_links else str(ino)).encode()


def record_ino(layer, path, ino, hidden_links=0):
    """Record on the upper copy ``path`` of ``layer`` the number ``ino`` it
    shows; True if recorded."""
    try:
        layer.setxattr(path, *record_item(ino, hidden_links))
    except OSError as e:
        # EPERM: user.* xattrs on a symlink or device node; ENOTSUP: the
        # upper's filesystem has no xattrs. The copy then shows its own
        # number (a documented limit of such uppers).
        if e.errno not in (errno.EPERM, errno.ENOTSUP):
            raise
        return False
    return True


def copy_record(layer, src, work, dst):
    """Carry the record of upper entry ``src`` over to its replacement
    ``dst`` in the work dir."""
    ino, hidden = recorded(layer, src)
    if ino is not None:
        record_ino(work, dst, ino, hidden)
