"""Whiteout and opaque-directory formats: how a layer says "nothing below".

Two on-disk formats exist and both are *read* in every layer; the mount's
``whiteout=`` option chooses which one is *written* to the upper:

``overlay`` (kernel overlayfs)
    a whiteout is a character device 0/0 named like the hidden entry; an
    opaque directory carries the xattr ``trusted.overlay.opaque=y`` (or
    ``user.overlay.opaque=y`` when the daemon may not set trusted xattrs).
    An upper written this way stays mountable by kernel overlayfs.

``oci`` (OCI image layers, aufs)
    a whiteout is an empty file ``.wh.NAME`` beside the hidden entry; an
    opaque directory contains ``.wh..wh..opq``. Names that start with
    ``.wh.`` are markers, never entries of the merged view.
"""

import os
import stat

# OCI/aufs: ".wh.NAME" in a directory hides NAME in every layer below.
WH_PREFIX = ".wh."
# OCI/aufs: this entry makes its directory opaque.
WH_OPAQUE = ".wh..wh..opq"
# overlayfs: xattrs that mark an opaque directory (value b"y").
OVL_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
OVL_OPAQUE_VALUE = b"y"
# xattr namespaces that belong to the union itself: never listed, read or set
# through the merged view (as overlayfs hides its own trusted.overlay.*).
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

FORMAT_OVERLAY = "overlay"
FORMAT_OCI = "oci"
FORMAT_AUTO = "auto"
FORMATS = (FORMAT_OVERLAY, FORMAT_OCI, FORMAT_AUTO)


def is_whiteout_stat(st):
    """True if ``st`` is an overlay-format whiteout (character device 0/0)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_private_xattr(name):
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def has_opaque_xattr(path, layer=None):
    """True if the directory at ``path`` carries an overlay opaque xattr:
    a backing path, or with ``layer`` a merged path of that Layer. One
    listxattr, and a getxattr only of a marker it names: most directories
    have none. (listxattr hides trusted.* from an unprivileged daemon, which
    could not read them either.)"""
    try:
        names = (layer.listxattr(path) if layer is not None
                 else os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False        # ENOTSUP: no xattrs here, so no marker
    for name in OVL_OPAQUE_XATTRS:
        if name not in names:
            continue
        try:
            value = (layer.getxattr(path, name) if layer is not None
                     else os.getxattr(path, name, follow_symlinks=False))
        except OSError:
            # ENODATA (removed meanwhile), EPERM (namespace unavailable to
            # us): either way this marker is absent.
            continue
        if value == OVL_OPAQUE_VALUE:
            return True
    return False


def can_write_overlay_whiteouts(work):
    """Whether the daemon may create 0/0 character devices (needs CAP_MKNOD).

    Probed by trying it in the work dir (a Layer): the only reliable answer
    inside user namespaces and containers.
    """
    probe = "/.unionfs-whiteout-probe"
    try:
        work.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except OSError:
        return False
    try:
        work.unlink(probe)
    except OSError:
        pass
    return True


def opaque_xattr_name():
    """The opaque xattr this daemon writes: trusted.* needs CAP_SYS_ADMIN."""
    return OVL_OPAQUE_XATTRS[0] if os.geteuid() == 0 else OVL_OPAQUE_XATTRS[1]


class Writer:
    """Writes whiteouts and opaque markers into the upper in one format.

    Only the marker-writing syscalls live here; making them atomic with the
    rest of an operation (work-dir temporaries, renames) is the caller's job.
    """

    def __init__(self, fmt):
        if fmt not in (FORMAT_OVERLAY, FORMAT_OCI):
            raise ValueError(fmt)
        self.format = fmt
        self.opaque_xattr = opaque_xattr_name()

    def make_device_whiteout(self, layer, path):
        """Create an overlay whiteout (0/0 character device) at ``path`` of ``layer``."""
        layer.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def marker_path(self, parent, name):
        """The OCI whiteout of ``name`` in directory ``parent`` (merged paths)."""
        return ("/" if parent == "/" else parent + "/") + WH_PREFIX + name

    def make_marker(self, layer, parent, name):
        """Create the OCI whiteout ``.wh.NAME`` in directory ``parent`` of ``layer``."""
        fd = layer.open(self.marker_path(parent, name), os.O_WRONLY | os.O_CREAT, 0o000)
        os.close(fd)

    def set_opaque(self, layer, path):
        """Mark directory ``path`` of ``layer`` opaque in this writer's format."""
        if self.format == FORMAT_OVERLAY:
            layer.setxattr(path, self.opaque_xattr, OVL_OPAQUE_VALUE)
        else:
            # A marker file is an entry: keep the directory's times as they
            # were, since marking it opaque is not a change the user made.
            st = layer.lstat(path)
            fd = layer.open(("/" if path == "/" else path + "/") + WH_OPAQUE,
                            os.O_WRONLY | os.O_CREAT, 0o000)
            os.close(fd)
            layer.utime(path, (st.st_atime_ns, st.st_mtime_ns))
