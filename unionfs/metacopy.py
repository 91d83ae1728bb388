"""Metadata-only copy-up (overlayfs's ``metacopy=on``), on-disk side.

A chmod, chown, utimes or xattr change of a lower regular file copies up its
metadata only: the upper copy is a sparse file of the same size, marked
*metacopy*, whose bytes still come from the lower file. The first open for
writing or truncate copies the data (and drops the marker) in one rename.

The markers are kernel overlayfs's, so kernel overlayfs mounted with
``metacopy=on`` reads the same tree:

- ``trusted.overlay.metacopy`` (empty value): the data is elsewhere;
- ``trusted.overlay.redirect``: the absolute merged path at which the lower
  layers hold the data. Written at copy-up, so the file may later be
  renamed, or its directory moved, without losing its data.

An unprivileged daemon writes the ``user.overlay.*`` forms (kernel overlayfs
reads those with ``userxattr``). Both forms are read.
"""

import errno
import os

METACOPY_XATTRS = ("trusted.overlay.metacopy", "user.overlay.metacopy")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
# On a directory that holds a metacopy: kernel overlayfs then looks each
# entry up when listing it, so that d_ino agrees with st_ino (which it takes
# from the lower data).
IMPURE_XATTRS = ("trusted.overlay.impure", "user.overlay.impure")

_OWN = 0 if os.geteuid() == 0 else 1


def markers(data_path):
    """The (xattr name, value) pairs that mark a file (a copy being built in
    the work dir) as metacopy, its data at merged ``data_path``."""
    return ((METACOPY_XATTRS[_OWN], b""), (REDIRECT_XATTRS[_OWN], os.fsencode(data_path)))


def mark_impure(layer, path):
    """Mark directory ``path`` of ``layer`` (the upper) as holding a
    metacopy. Once, as overlayfs does: reading the mark costs no journal
    write, setting it again (every copy-up of a chown -R) would; and once
    known, it is remembered with the directory's descriptor (DirFd)."""
    d = layer.dir(path)
    if d.impure:
        return
    try:
        marked = layer.getxattr(path, IMPURE_XATTRS[_OWN]) == b"y"
    except OSError:
        marked = False  # ENODATA: not marked yet (other errors: setxattr says)
    if not marked:
        layer.setxattr(path, IMPURE_XATTRS[_OWN], b"y")
    d.impure = True


def data_path(get, path, xattr_names):
    """The merged path whose lower entry holds the data of upper file
    ``path``, or None if it holds its own. ``get(name)`` reads one of its
    xattrs; ``xattr_names``: its xattr names, already listed by the caller."""
    for i, name in enumerate(METACOPY_XATTRS):
        if name in xattr_names:
            try:
                redirect = os.fsdecode(get(REDIRECT_XATTRS[i]))
            except OSError:     # ENODATA: not renamed since (a kernel's copy)
                return path
            # A relative redirect (a kernel rename within one directory)
            # names the entry beside it.
            if not redirect.startswith("/"):
                return path.rpartition("/")[0] + "/" + redirect
            return redirect
    return None


class LowerData:
    """Finds the data of metacopy files of an upper over ``lowerdirs`` (top
    first) without a union: for readers of the upper alone (commit)."""

    def __init__(self, lowerdirs):
        from unionfs.layers import Layer, LayerStack
        self._stack = LayerStack(None, [Layer(d, i + 1) for i, d in enumerate(lowerdirs)])

    def open(self, upper, path):
        """An fd (read-only) on the bytes of file ``path`` of ``upper`` (a
        Layer): its own unless it is a metacopy, else its lower data."""
        try:
            names = upper.listxattr(path)
        except OSError:
            names = ()
        data = data_path(lambda name: upper.getxattr(path, name), path, names) if names else None
        if data is None:
            return upper.open(path, os.O_RDONLY)
        node = self._stack.lookup(data)
        if node is None or node.is_dir:
            raise OSError(errno.EIO, "metacopy without its lower data", upper.root + path)
        return node.top.open(data, os.O_RDONLY)
