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
    path: str                      # in the upper (for a whiteout: the whiteout itself)
    st: os.stat_result
    opaque: bool = False           # dirs only
    names: set = field(default_factory=set)   # dirs only: every name the upper has in it

    @property
    def display(self) -> str:
        return "/" + "/".join(self.parts)


def file_xattrs(path: str) -> dict[str, bytes]:
    """The xattrs a layer should carry for `path`, sorted; the union's own
    bookkeeping (overlay opaque markers etc.) is left out."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for name in sorted(names):
        if wh.is_private_xattr(name):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def walk_upper(upper: str):
    """Yield `Entry`s of the upper dir in layer order (see the module doc)."""
    yield from _walk(upper, (), os.lstat(upper))


def _walk(path: str, parts: tuple[str, ...], st: os.stat_result):
    opaque = wh.has_opaque_xattr(path)
    whiteouts, nodes, names = [], [], set()
    with os.scandir(path) as it:
        listing = sorted(it, key=lambda e: os.fsencode(e.name))
    for e in listing:
        est = e.stat(follow_symlinks=False)
        names.add(e.name)
        if e.name == wh.WH_OPAQUE:
            opaque = True
        elif e.name.startswith(wh.WH_PREFIX + wh.WH_PREFIX):
            continue  # other ".wh..wh.*" names are aufs metadata, not entries
        elif e.name.startswith(wh.WH_PREFIX):
            whiteouts.append(Entry("whiteout", parts + (e.name[len(wh.WH_PREFIX):],), e.path, est))
        elif wh.is_whiteout_stat(est):
            whiteouts.append(Entry("whiteout", parts + (e.name,), e.path, est))
        else:
            nodes.append((e, est))
    if parts:
        yield Entry("dir", parts, path, st, opaque, names)
    yield from sorted(whiteouts, key=lambda w: os.fsencode(w.parts[-1]))
    for e, est in nodes:
        if stat.S_ISDIR(est.st_mode):
            yield from _walk(e.path, parts + (e.name,), est)
        else:
            yield Entry("node", parts + (e.name,), e.path, est)


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
