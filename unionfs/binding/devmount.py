"""Mounting for the /dev/fuse binding (``devfuse``): the ``-o`` options
sorted into mount(2)'s flags and data, ``mount(2)`` with ``fd=`` as root,
``fusermount3`` with ``_FUSE_COMMFD`` otherwise, and unmounting.

Apart from ``devfuse`` so that ``fuse-unionfs`` / ``unionfs mount`` can
mount before anything that serves requests is loaded (see
``mount._mount_early``): this module needs only os, stat and ctypes (which
the union's modules load anyway), not the request code, its ``struct``
layouts, ``ctypes`` structures or threads. ``devfuse`` imports what it
serves a mount with from here.
"""

import ctypes
import os
import stat

from unionfs.binding import MountError

PASSTHROUGH = True                      # -o passthrough=off turns it off
DEFAULT_OPTIONS = {}
DROPPED_OPTIONS = {"big_writes", "nonempty"}   # libfuse 2's; nothing to do here

# Mount flags (mount(2)) by option; the second value says set or clear.
_MS = {"ro": (os.ST_RDONLY, True), "rw": (os.ST_RDONLY, False),
       "nosuid": (os.ST_NOSUID, True), "suid": (os.ST_NOSUID, False),
       "nodev": (os.ST_NODEV, True), "dev": (os.ST_NODEV, False),
       "noexec": (os.ST_NOEXEC, True), "exec": (os.ST_NOEXEC, False),
       "sync": (os.ST_SYNCHRONOUS, True), "async": (os.ST_SYNCHRONOUS, False),
       "noatime": (os.ST_NOATIME, True), "atime": (os.ST_NOATIME, False),
       "dirsync": (128, True)}
# Options the kernel's fuse takes in the mount data (besides fd= and friends).
_KERNEL_OPTS = {"allow_other", "default_permissions", "max_read", "blksize",
                "context", "fscontext", "defcontext", "rootcontext"}
# Options of the connection, applied at INIT.
_CONN_OPTS = {"max_write", "max_readahead", "max_background", "congestion_threshold",
              "passthrough"}
# libfuse 3's connection options that change nothing here: splicing is
# libfuse's way of moving data, and no locks are served remotely.
_CONN_FLAGS = {"async_read", "sync_read", "atomic_o_trunc", "no_remote_lock",
               "no_remote_flock", "no_remote_posix_lock", "splice_read",
               "splice_write", "splice_move", "no_splice_read", "no_splice_write",
               "no_splice_move", "debug"}
_FUSERMOUNT_OPTS = {"auto_unmount", "allow_root", "blkdev"}


_libc = None


def _libc_call(name, *args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _split(options):
    """Sort libfuse-style ``-o`` options into mount flags, kernel mount data,
    fusermount's own, and the connection's."""
    flags = os.ST_NOSUID | os.ST_NODEV          # libfuse's defaults, as before
    kernel, fusermount, conn, names = [], [], {}, []
    fsname, subtype = "unionfs", None
    for o in options:
        key, eq, value = o.partition("=")
        if key in DROPPED_OPTIONS:
            continue
        if key in _MS and not eq:
            bit, on = _MS[key]
            flags = flags | bit if on else flags & ~bit
            names.append(key)
        elif key == "fsname":
            fsname = value
        elif key == "subtype":
            subtype = value
        elif key in _KERNEL_OPTS:
            kernel.append(o)
        elif key in _FUSERMOUNT_OPTS:
            fusermount.append(o)
        elif key in _CONN_OPTS and eq:
            conn[key] = value
        elif key in _CONN_FLAGS:
            conn[key] = True
        else:
            raise MountError(f"unknown FUSE option {o!r}")
    return flags, kernel, fusermount, conn, fsname, subtype, names


def _open_device():
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open /dev/fuse: {e.strerror}")


def _mount_as_root(mountpoint, flags, kernel, fsname, subtype):
    fd = _open_device()
    st = os.stat(mountpoint)
    data = [f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode) | 0:o}",
            f"user_id={os.getuid()}", f"group_id={os.getgid()}"] + kernel
    fstype = "fuse." + subtype if subtype else "fuse"
    try:
        _libc_call("mount", fsname.encode(), os.fsencode(mountpoint), fstype.encode(),
                   ctypes.c_ulong(flags), ",".join(data).encode())
    except OSError as e:
        os.close(fd)
        raise MountError(f"mount {mountpoint}: {e.strerror}")
    return fd


def _fusermount():
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/bin", "/bin"]:
        p = os.path.join(d or ".", "fusermount3")
        if os.access(p, os.X_OK):
            return p
    raise MountError("fusermount3 not found (Debian/Ubuntu: apt install fuse3)")


def _mount_with_fusermount(mountpoint, names, kernel, fusermount, fsname, subtype):
    """Have fusermount3 (set-uid root) mount, and take the device fd it opened
    from the socket named by _FUSE_COMMFD. With auto_unmount it stays
    running to unmount when we die; its process is returned to keep."""
    import socket
    import subprocess
    opts = names + kernel + fusermount + [f"fsname={fsname}"]
    if subtype:
        opts.append(f"subtype={subtype}")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    try:
        proc = subprocess.Popen([_fusermount(), "-o", ",".join(opts), "--", mountpoint],
                                env=env, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    except OSError:
        fds = []
    keep = "auto_unmount" in fusermount
    if not keep or not fds:
        ours.close()
        proc.wait()
    if not fds:
        raise MountError(f"fusermount3 could not mount {mountpoint}")
    os.set_inheritable(fds[0], False)
    return fds[0], (proc, ours) if keep else None


def _unmount(mountpoint, as_root):
    """Detach the mount (lazily: files still open keep it until closed)."""
    try:
        if as_root:
            _libc_call("umount2", os.fsencode(mountpoint), 2)        # MNT_DETACH
        else:
            import subprocess
            subprocess.run([_fusermount(), "-u", "-q", "-z", "--", mountpoint],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
    except (OSError, MountError):
        pass


def can_mount_early(options):
    """True if ``mount_early`` can mount with these options: as root with
    mount(2) (fusermount3's options need fusermount3, which we keep
    running for them)."""
    return os.geteuid() == 0 and not _split(options)[2]


def mount_early(mountpoint, options):
    """Mount ``mountpoint`` with mount(2) and return the device fd, for
    ``run(..., fd=)`` to serve later (maybe in another process): the kernel
    queues requests, INIT first, until the fd is read. MountError on failure."""
    flags, kernel, _, _, fsname, subtype, _ = _split(options)
    return _mount_as_root(mountpoint, flags, kernel, fsname, subtype)


def detach(mountpoint):
    """Detach a mount made by ``mount_early`` that will not be served."""
    _unmount(mountpoint, as_root=True)
