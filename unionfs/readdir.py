"""Merged directory listings (overlayfs's readdir.c).

A merged directory lists the union of its layers' entries: the top-most
entry of a name wins, a whiteout hides the name in the layers below it, and
markers (whiteouts, ``.wh.*`` files) never appear. The caller adds "." and "..".
"""

import os
import stat

from unionfs import whiteout as wh
from unionfs.inodes import recorded_ino

_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK


def merged_entries(path, node):
    """List merged directory ``path`` (a DIR node).

    Returns ``[(name, file_type_bits, inode), ...]`` in layer order, top layer
    first; the type comes from the directory entry itself (d_type), so no
    ``stat`` is needed except for device nodes, which may be whiteouts. The
    inode number is the one ``stat`` shows (inodes.py): for upper entries,
    one getxattr each tells whether a copy-up recorded it.
    """
    out = []
    seen = set()
    hidden = set()
    for layer in node.layers:
        tag = layer.ino_tag
        if not layer.upper:
            # A lower: one read gives the entries and the layer's index.
            _, shown, layer_hidden = layer.scan(path)
            for name, ftype, ino in shown:
                if name in seen or name in hidden:
                    continue
                seen.add(name)
                out.append((name, ftype, ino | tag))
            hidden.update(layer_hidden)
            continue
        layer_hidden = []
        prefix = "/" if path == "/" else path + "/"
        with layer.scandir(path) as it:
            for e in it:
                name = e.name
                if name.startswith(wh.WH_PREFIX):
                    if name != wh.WH_OPAQUE and not name.startswith(wh.WH_PREFIX + wh.WH_PREFIX):
                        layer_hidden.append(name[len(wh.WH_PREFIX):])
                    continue
                if name in seen or name in hidden:
                    continue
                if e.is_dir(follow_symlinks=False):
                    ftype = _S_IFDIR
                elif e.is_symlink():
                    ftype = _S_IFLNK
                elif e.is_file(follow_symlinks=False):
                    ftype = _S_IFREG
                else:
                    st = e.stat(follow_symlinks=False)
                    if wh.is_whiteout_stat(st):
                        layer_hidden.append(name)
                        continue
                    ftype = stat.S_IFMT(st.st_mode)
                seen.add(name)
                ino = recorded_ino(layer, prefix + name)
                out.append((name, ftype, e.inode() | tag if ino is None else ino))
        # Markers hide names in the layers below, not in their own layer.
        hidden.update(layer_hidden)
    return out

