"""Reading a container's upper directory: what it adds, changes and deletes.

`walk_upper` yields the upper's entries in the order an OCI layer lists them
(a directory, then its opaque marker and whiteouts, then its other entries,
each group sorted by name), understanding both whiteout formats:
  overlay: a character device 0/0 is a whiteout; xattr trusted.overlay.opaque=y
           (user.overlay.opaque=y unprivileged) makes a directory opaque;
  oci:     `.wh.NAME` is a whiteout, `.wh..wh..opq` makes its directory opaque.
`diff` turns that into docker-diff lines, looking names up in the lower layers
(when known) to tell a change (C) from an addition (A).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from unionfs import whiteout as wh
from unionfs.layers import Layer, LayerStack
from unionfs.readdir import merged_entries


@dataclass
class Entry:
    kind: str                      # "dir", "node" (any non-directory) or "whiteout"
    parts: tuple[str, ...]
    path: str                      # of `upper` (for a whiteout: the whiteout itself)
    st: os.stat_result
    upper: Layer                   # the upper dir: reach `path` through it (any depth)
    opaque: bool = False           # dirs only
    names: set = field(default_factory=set)   # dirs only: every name the upper has in it

    @property
    def display(self) -> str:
        return "/" + "/".join(self.parts)


def file_xattrs(upper: Layer, path: str) -> dict[str, bytes]:
    """The xattrs a layer should carry for `path` of `upper`, sorted; the
    union's own bookkeeping (overlay opaque markers etc.) is left out."""
    try:
        names = upper.listxattr(path)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for name in sorted(names):
        if wh.is_private_xattr(name):
            continue
        try:
            out[name] = upper.getxattr(path, name)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def walk_upper(upper: str):
    """Yield `Entry`s of the upper dir in layer order (see the module doc).
    Entries are reached relative to their directories (layers.Layer), so
    paths longer than PATH_MAX work."""
    layer = Layer(upper, 0, upper=True)
    yield from _walk(layer, "/", (), layer.lstat("/"))


def _walk(upper: Layer, path: str, parts: tuple[str, ...], st: os.stat_result):
    opaque = wh.has_opaque_xattr(path, upper)
    whiteouts, nodes, names = [], [], set()
    prefix = "/" if path == "/" else path + "/"
    with upper.scandir(path) as it:
        listing = sorted(((e.name, e.stat(follow_symlinks=False)) for e in it),
                         key=lambda e: os.fsencode(e[0]))
    for name, est in listing:
        names.add(name)
        if name == wh.WH_OPAQUE:
            opaque = True
        elif name.startswith(wh.WH_PREFIX + wh.WH_PREFIX):
            continue  # other ".wh..wh.*" names are aufs metadata, not entries
        elif name.startswith(wh.WH_PREFIX):
            whiteouts.append(Entry("whiteout", parts + (name[len(wh.WH_PREFIX):],),
                                   prefix + name, est, upper))
        elif wh.is_whiteout_stat(est):
            whiteouts.append(Entry("whiteout", parts + (name,), prefix + name, est, upper))
        else:
            nodes.append((name, est))
    if parts:
        yield Entry("dir", parts, path, st, upper, opaque, names)
    yield from sorted(whiteouts, key=lambda w: os.fsencode(w.parts[-1]))
    for name, est in nodes:
        if stat.S_ISDIR(est.st_mode):
            yield from _walk(upper, prefix + name, parts + (name,), est)
        else:
            yield Entry("node", parts + (name,), prefix + name, est, upper)


class LowerView:
    """Lookups in a stack of read-only layers (top first), exactly as the
    union filesystem resolves them (its own lookup and listing code)."""

    def __init__(self, lowers: list[str]):
        self._stack = LayerStack(None, [Layer(d, i) for i, d in enumerate(lowers)])

    def _node(self, parts: tuple[str, ...]):
        try:
            return self._stack.lookup("/" + "/".join(parts))
        except NotADirectoryError:
            return None

    def exists(self, parts: tuple[str, ...]) -> bool:
        return self._node(parts) is not None

    def listdir(self, parts: tuple[str, ...]) -> set[str]:
        node = self._node(parts)
        if node is None or not node.is_dir:
            return set()
        return {name for name, _, _ in merged_entries("/" + "/".join(parts), node)}


def diff(upper: str, lowers: list[str] | None) -> list[tuple[str, str]]:
    """docker-diff lines as (code, path), sorted by path. Without `lowers`
    nothing can be told to exist below: every entry is an addition."""
    view = LowerView(lowers) if lowers is not None else None
    changes: dict[str, str] = {}
    for entry in walk_upper(upper):
        if entry.kind == "whiteout":
            if view is None or view.exists(entry.parts):
                changes[entry.display] = "D"
            continue
        existed = view is not None and view.exists(entry.parts)
        changes[entry.display] = "C" if existed else "A"
        if entry.kind == "dir" and entry.opaque and existed:
            for name in view.listdir(entry.parts) - entry.names:
                changes.setdefault(entry.display + "/" + name, "D")
    return sorted(((code, path) for path, code in changes.items()), key=lambda c: os.fsencode(c[1]))
