"""Paths inside a container's rootfs (or a layer), resolved as the container
would see them: a symlink is followed relative to the rootfs, never out of
it, as runc's securejoin does. The kernel does the walk: openat2(2) with
RESOLVE_IN_ROOT (Linux 5.6+), so no race with a container that changes the
tree meanwhile."""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import struct

from unionfs.errors import UserError

_SYS_OPENAT2 = 437      # the same number on every architecture (the unified syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.c_char_p(how), ctypes.c_size_t(len(how)))
    if fd < 0:
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            raise UserError("this kernel lacks openat2(2) (Linux 5.6+), needed to resolve "
                            "paths inside a container safely")
        raise OSError(e, os.strerror(e), path)
    return fd


def clean(unsafe_path: str) -> str:
    """A container path as an absolute, lexically clean path ("/a/b")."""
    return posixpath.normpath("/" + unsafe_path).replace("//", "/")


def open_in(root: str, unsafe_path: str, flags: int = os.O_RDONLY, follow: bool = True) -> int:
    """Open `unsafe_path` inside `root`. follow=True: symlinks are followed
    as inside a chroot at `root`; follow=False: any symlink on the way is an
    error (ELOOP), for walking a layer, whose links mean nothing on their own."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        resolve = (RESOLVE_IN_ROOT if follow else RESOLVE_NO_SYMLINKS) | RESOLVE_NO_MAGICLINKS
        return _openat2(rootfd, clean(unsafe_path).lstrip("/") or ".", flags, resolve)
    finally:
        os.close(rootfd)


_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV)


def _unreadable(root: str, unsafe_path: str, e: OSError) -> UserError:
    return UserError(f"{root}: cannot read {clean(unsafe_path)}: {e.strerror}")


def read_file(root: str, unsafe_path: str, limit: int = 1 << 20) -> bytes | None:
    """The content of a regular file inside `root`, or None if there is none."""
    try:
        fd = open_in(root, unsafe_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise _unreadable(root, unsafe_path, e) from None
    with os.fdopen(fd, "rb") as f:
        if not os.path.isfile(f"/proc/self/fd/{fd}"):
            return None
        return f.read(limit)


def stat_in(root: str, unsafe_path: str, follow: bool = True) -> os.stat_result | None:
    """stat of `unsafe_path` inside `root`, or None if it is not there."""
    try:
        fd = open_in(root, unsafe_path, os.O_PATH, follow)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise _unreadable(root, unsafe_path, e) from None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


MAX_LINKS = 40      # symlinks followed while making one path, as the kernel's limit


def _inside_path(root: str, fd: int) -> str:
    """The path inside `root` of the directory open as `fd` (already resolved)."""
    real = os.readlink(f"/proc/self/fd/{fd}")
    base = os.path.realpath(root)
    if real != base and not real.startswith(base.rstrip("/") + "/"):
        raise UserError(f"{root}: a path resolved outside the rootfs ({real})")
    return clean(real[len(base):])


def mkdir_all(root: str, unsafe_path: str, _links: int = 0):
    """`mkdir -p` of `unsafe_path` inside `root`, every component resolved
    inside it: a symlink on the way (even a dangling one) leads to a
    directory made inside the root, never outside (as docker's
    MkdirAllInRoot)."""
    parts = [p for p in clean(unsafe_path).split("/") if p]
    for i, name in enumerate(parts):
        sub = "/" + "/".join(parts[:i + 1])
        if stat_in(root, sub) is not None:
            continue
        parent = open_in(root, "/" + "/".join(parts[:i]), os.O_PATH | os.O_DIRECTORY)
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
                continue
            except FileExistsError:
                target = os.readlink(name, dir_fd=parent)   # a dangling symlink
            if _links >= MAX_LINKS:
                raise UserError(f"{unsafe_path}: too many levels of symbolic links")
            base = _inside_path(root, parent)
            rest = "/".join(parts[i + 1:])
            path = target if target.startswith("/") else f"{base}/{target}"
            return mkdir_all(root, f"{path}/{rest}", _links + 1)
        finally:
            os.close(parent)
