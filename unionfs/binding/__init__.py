"""How requests reach ``fs.py``: by default the kernel's FUSE protocol
spoken directly on ``/dev/fuse`` (``devfuse``), otherwise libfuse's
low-level API bound through ctypes: libfuse 3 where it is installed,
libfuse 2.9 (the library fusepy loads) otherwise.

``UNIONFS_LIBFUSE=3`` or ``=2`` in the environment forces a libfuse binding
(for tests, for comparing, and as a fallback where /dev/fuse cannot be used
directly). Every binding offers the same surface: operations with libfuse's
low-level signatures and its ``reply_*`` calls, so the adapter is one. The
low-level API (not fusepy's path-based one) lets the daemon choose inode
numbers: one kernel inode per file, as with overlayfs.
"""

import os

ENV = "UNIONFS_LIBFUSE"


class MountError(Exception):
    """The binding (libfuse, or the kernel for devfuse) refused the mount or
    the options. Here, not in ``common``, so that mounting needs none of
    common's ctypes structures (``common.MountError`` is this class)."""


def _devfuse_usable():
    """/dev/fuse opens for us, and we can mount: as root with mount(2),
    otherwise through fusermount3."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return False
    if os.geteuid() == 0:
        return True
    path = os.environ.get("PATH", "") + ":/usr/bin:/bin"
    return any(os.access(os.path.join(d, "fusermount3"), os.X_OK) for d in path.split(":") if d)


def _wanted():
    want = os.environ.get(ENV, "")
    if want not in ("", "2", "3"):
        raise ValueError(f"{ENV}={want}: must be 2 or 3")
    return want


def is_devfuse():
    """True if ``load()`` picks ``devfuse``; nothing is loaded to tell."""
    return _wanted() == "" and _devfuse_usable()


def load():
    """The binding module to use (``devfuse``, ``libfuse3`` or ``libfuse2``)."""
    want = _wanted()
    if want == "" and _devfuse_usable():
        from unionfs.binding import devfuse
        return devfuse
    if want != "2":
        try:
            from unionfs.binding import libfuse3
            return libfuse3
        except OSError:
            if want == "3":
                raise
    from unionfs.binding import libfuse2
    return libfuse2
