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

# OCI / aufs whiteout names (OCI image-spec, layer.md "Whiteouts").
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
# Overlay-format opaque markers (value "y").
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
OPAQUE_VALUE = b"y"
# Xattrs that belong to the union filesystem's bookkeeping, not to the files:
# never committed into a layer.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "trusted.unionfs.", "user.unionfs.")


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


def is_overlay_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def has_opaque_xattr(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == OPAQUE_VALUE:
                return True
        except OSError as e:
            # ENODATA: not set; ENOTSUP/EPERM: a namespace we may not read here.
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
    return False


def file_xattrs(path: str) -> dict[str, bytes]:
    """The xattrs a layer should carry for `path` (sorted, private ones left out)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for name in sorted(names):
        if name.startswith(PRIVATE_XATTR_PREFIXES):
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
    opaque = has_opaque_xattr(path)
    whiteouts, nodes, names = [], [], set()
    with os.scandir(path) as it:
        listing = sorted(it, key=lambda e: os.fsencode(e.name))
    for e in listing:
        est = e.stat(follow_symlinks=False)
        names.add(e.name)
        if e.name == WH_OPAQUE:
            opaque = True
        elif e.name.startswith(WH_PREFIX):
            whiteouts.append(Entry("whiteout", parts + (e.name[len(WH_PREFIX):],), e.path, est))
        elif is_overlay_whiteout(est):
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
    """Lookups in a stack of read-only layers (top first), as the union
    filesystem resolves them: whiteouts hide, non-directories hide what is
    below, directories merge until an opaque one; symlinks are not followed."""

    def __init__(self, lowers: list[str]):
        self.lowers = lowers

    @staticmethod
    def _whited_out(d: str, name: str) -> bool:
        return os.path.lexists(os.path.join(d, WH_PREFIX + name))

    def lookup(self, parts: tuple[str, ...]):
        """("dir", [layer dirs]) | ("other", None) | (None, None)."""
        dirs = list(self.lowers)
        for i, name in enumerate(parts):
            found, other = [], False
            for d in dirs:
                p = os.path.join(d, name)
                try:
                    st = os.lstat(p)
                except (FileNotFoundError, NotADirectoryError):
                    st = None
                if st is not None and is_overlay_whiteout(st):
                    break
                if st is not None:
                    if stat.S_ISDIR(st.st_mode):
                        found.append(p)
                        if has_opaque_xattr(p) or os.path.lexists(os.path.join(p, WH_OPAQUE)):
                            break
                    else:
                        other = not found
                        break
                if self._whited_out(d, name):
                    break
            if other:
                return ("other", None) if i == len(parts) - 1 else (None, None)
            if not found:
                return None, None
            dirs = found
        return "dir", dirs

    def exists(self, parts: tuple[str, ...]) -> bool:
        return self.lookup(parts)[0] is not None

    def listdir(self, parts: tuple[str, ...]) -> set[str]:
        kind, dirs = self.lookup(parts)
        if kind != "dir":
            return set()
        visible, hidden = set(), set()
        for d in dirs:
            names = os.listdir(d)
            layer_hidden = set()
            for name in names:
                if name == WH_OPAQUE:
                    continue
                if name.startswith(WH_PREFIX):
                    layer_hidden.add(name[len(WH_PREFIX):])
                elif is_overlay_whiteout(os.lstat(os.path.join(d, name))):
                    layer_hidden.add(name)
                elif name not in hidden:
                    visible.add(name)
            hidden |= layer_hidden
        return visible


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
