"""The libfuse low-level API, bound through ctypes: libfuse 3 where it is
installed, libfuse 2.9 (the library fusepy loads) otherwise.

``UNIONFS_LIBFUSE=2`` or ``=3`` in the environment forces one (for tests and
for comparing them). fusepy only does the loading of libfuse 2 and gives the
``struct stat`` layouts; its path-based API is not used, because it gives
every path its own kernel inode (two names of one hard link would be two
inodes with two attribute caches, and an unlinked open file could not be
stat'ed). The low-level API lets the daemon choose inode numbers: one kernel
inode per file, as with overlayfs.
"""

import os

ENV = "UNIONFS_LIBFUSE"


def load():
    """The binding module to use (``libfuse3`` or ``libfuse2``)."""
    want = os.environ.get(ENV, "")
    if want not in ("", "2", "3"):
        raise ValueError(f"{ENV}={want}: must be 2 or 3")
    if want != "2":
        try:
            from unionfs.binding import libfuse3
            return libfuse3
        except OSError:
            if want == "3":
                raise
    from unionfs.binding import libfuse2
    return libfuse2
