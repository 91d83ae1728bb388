"""Unpack one layer tar into a fresh directory, never writing outside it.

Every filesystem call is made relative to a directory file descriptor that
was opened component by component with O_NOFOLLOW, so a symlink planted by an
earlier entry can never redirect a later one. Tar entry names are untrusted
(`unsafe_name`) until `split_name` has checked them.

Whiteout files (`.wh.NAME`, `.wh..wh..opq`) are kept as they are: the union
filesystem reads the OCI whiteout format in every lower layer.

Refused, each with a message naming the entry: absolute names, `..`, paths
through a symlink or a non-directory, hardlinks to anything not already
unpacked in this layer, duplicate entries, unknown entry types, and malformed
or truncated tars. Device nodes need root; without it they are skipped with
one warning.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from dataclasses import dataclass

from unionfs.errors import UserError

# The xattr key prefix for extended attributes in PAX headers (GNU tar, Go, umoci).
PAX_XATTR_PREFIX = "SCHILY.xattr."
# How many directory fds the parent cache keeps open at most.
_FD_CACHE_MAX = 64
# How much of the tar stream is remembered to check what follows the last entry.
_TAIL_KEEP = 1 << 16

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def split_name(unsafe_name: str, what: str) -> tuple[str, ...]:
    """Check a tar entry name and return its components ("" root is ())."""
    if "\0" in unsafe_name:
        raise UserError(f'{what}: entry "{unsafe_name}" has a NUL byte in its name')
    if unsafe_name.startswith("/"):
        raise UserError(f'{what}: entry "{unsafe_name}" is an absolute path')
    parts = tuple(p for p in unsafe_name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UserError(f'{what}: entry "{unsafe_name}" escapes the layer')
    return parts


@dataclass
class UnpackStats:
    entries: int = 0
    skipped_devices: int = 0


class _Tail:
    """A pass-through reader that remembers the last bytes it handed out, so
    that after the last tar entry we can check the rest is only zero padding."""

    def __init__(self, raw):
        self._raw = raw
        self.pos = 0
        self.tail = bytearray()

    def read(self, n=-1):
        data = self._raw.read(n)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > _TAIL_KEEP:
            del self.tail[:len(self.tail) - _TAIL_KEEP]
        return data


class _Unpacker:
    def __init__(self, dest: str, what: str, warn):
        self.what = what
        self.warn = warn
        self.root_fd = os.open(dest, _O_DIR)
        self.is_root = os.geteuid() == 0
        self.fd_cache: dict[tuple[str, ...], int] = {}
        self.seen: set[tuple[str, ...]] = set()          # explicit entries
        self.implicit_dirs: set[tuple[str, ...]] = set()  # parents made by us
        self.nondirs: set[tuple[str, ...]] = set()        # hardlink targets
        self.dirs: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        self.warned: set[str] = set()
        self.stats = UnpackStats()

    def close(self):
        for fd in self.fd_cache.values():
            os.close(fd)
        self.fd_cache.clear()
        os.close(self.root_fd)

    def warn_once(self, key: str, message: str):
        if key not in self.warned:
            self.warned.add(key)
            self.warn(f"{self.what}: {message}")

    # -- walking ---------------------------------------------------------------

    def dir_fd(self, parts: tuple[str, ...], unsafe_name: str, create: bool) -> int:
        """An fd for directory `parts` (cached; do not close), walking one
        component at a time without following symlinks; missing parents are
        created (mode 0755) when `create`."""
        if not parts:
            return self.root_fd
        fd = self.fd_cache.get(parts)
        if fd is not None:
            return fd
        parent = self.dir_fd(parts[:-1], unsafe_name, create)
        name = parts[-1]
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise UserError(f'{self.what}: entry "{unsafe_name}": "{"/".join(parts)}" does not exist') from None
            os.mkdir(name, 0o755, dir_fd=parent)
            self.implicit_dirs.add(parts)
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise UserError(f'{self.what}: entry "{unsafe_name}" goes through "{"/".join(parts)}", '
                                f'which is {kind}') from None
            raise
        if len(self.fd_cache) >= _FD_CACHE_MAX:
            for cached in self.fd_cache.values():
                os.close(cached)
            self.fd_cache.clear()
        self.fd_cache[parts] = fd
        return fd

    # -- entries ---------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo):
        unsafe_name = ti.name
        parts = split_name(unsafe_name, self.what)
        if parts in self.seen:
            raise UserError(f'{self.what}: entry "{unsafe_name}" appears twice in the layer')
        if parts in self.implicit_dirs and not ti.isdir():
            raise UserError(f'{self.what}: entry "{unsafe_name}" is not a directory, but earlier '
                            'entries were put inside it')
        self.seen.add(parts)
        self.stats.entries += 1
        if not parts:
            if not ti.isdir():
                raise UserError(f'{self.what}: entry "{unsafe_name}" names the layer root but is not a directory')
            self.dirs.append((parts, ti))
            return
        pfd = self.dir_fd(parts[:-1], unsafe_name, create=True)
        name = parts[-1]
        if ti.type in _REGULAR_TYPES:
            self.regular(tf, ti, pfd, name)
        elif ti.isdir():
            if parts not in self.implicit_dirs:
                os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs.append((parts, ti))
            return
        elif ti.issym():
            os.symlink(ti.linkname, name, dir_fd=pfd)
            self.metadata(pfd, name, ti, symlink=True)
        elif ti.islnk():
            self.hardlink(ti, pfd, name)
        elif ti.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self.metadata(pfd, name, ti)
        elif ti.ischr() or ti.isblk():
            if not self.device(ti, pfd, name):
                self.seen.discard(parts)
                return
        else:
            raise UserError(f'{self.what}: entry "{unsafe_name}" has an unsupported type {ti.type!r}')
        self.nondirs.add(parts)

    def regular(self, tf, ti, pfd, name):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(ti)
            remaining = ti.size
            while remaining:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    raise UserError(f'{self.what}: entry "{ti.name}" is truncated')
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                remaining -= len(chunk)
            if self.is_root:
                os.fchown(fd, ti.uid, ti.gid)
            os.fchmod(fd, stat.S_IMODE(ti.mode))
            self.xattrs(fd, ti)
            os.utime(fd, ns=_times_ns(ti))
        finally:
            os.close(fd)

    def hardlink(self, ti, pfd, name):
        unsafe_target = ti.linkname
        try:
            target = split_name(unsafe_target, self.what)
        except UserError:
            target = None
        if not target or target not in self.nondirs:
            raise UserError(f'{self.what}: entry "{ti.name}" is a hardlink to "{unsafe_target}", '
                            'which points outside the layer (not an earlier file of this layer)')
        tpfd = self.dir_fd(target[:-1], ti.name, create=False)
        os.link(target[-1], name, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)

    def device(self, ti, pfd, name) -> bool:
        kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
        if self.is_root:
            try:
                os.mknod(name, 0o600 | kind, os.makedev(ti.devmajor, ti.devminor), dir_fd=pfd)
            except PermissionError:
                pass
            else:
                self.metadata(pfd, name, ti)
                return True
        self.stats.skipped_devices += 1
        self.warn_once("device", f'device nodes need root: skipped "{ti.name}" and any others')
        return False

    # -- metadata --------------------------------------------------------------

    def metadata(self, pfd, name, ti, symlink=False):
        """Owner, mode, xattrs, times of a non-regular entry just created
        (by us, so `name` is not a symlink unless `symlink`)."""
        if self.is_root:
            os.chown(name, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
        if not symlink:
            os.chmod(name, stat.S_IMODE(ti.mode), dir_fd=pfd)
        self.xattrs(f"/proc/self/fd/{pfd}/{name}", ti, follow=False)
        os.utime(name, ns=_times_ns(ti), dir_fd=pfd, follow_symlinks=False)

    def xattrs(self, target, ti, follow=True):
        for key, value in ti.pax_headers.items():
            if not key.startswith(PAX_XATTR_PREFIX):
                continue
            xname = key[len(PAX_XATTR_PREFIX):]
            try:
                os.setxattr(target, xname, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=follow)
            except OSError as e:
                # Not permitted (trusted.*, security.* without privilege) or not
                # supported by the store's filesystem: the layer is still usable.
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                    raise
                ns = xname.split(".", 1)[0]
                self.warn_once(f"xattr:{ns}", f"cannot set {ns}.* xattrs here ({e.strerror}): "
                                              f'skipped {xname} on "{ti.name}" and any others')

    def finish_dirs(self):
        """Directory metadata, deepest first: after all children exist (so
        their creation does not bump mtimes, and modes without write or
        search permission do not get in the way)."""
        for parts, ti in sorted(self.dirs, key=lambda d: len(d[0]), reverse=True):
            fd = self.dir_fd(parts, ti.name, create=False) if parts else self.root_fd
            if self.is_root:
                os.fchown(fd, ti.uid, ti.gid)
            os.fchmod(fd, stat.S_IMODE(ti.mode))
            self.xattrs(fd, ti)
            os.utime(fd, ns=_times_ns(ti))


def _times_ns(ti: tarfile.TarInfo) -> tuple[int, int]:
    mtime = int(ti.mtime * 1_000_000_000)
    atime = ti.pax_headers.get("atime")
    try:
        atime_ns = int(float(atime) * 1_000_000_000) if atime else mtime
    except ValueError:
        atime_ns = mtime
    return atime_ns, mtime


def unpack_layer(tar_stream, dest: str, what: str, warn, progress=None) -> UnpackStats:
    """Unpack the tar read from `tar_stream` into the existing empty dir `dest`.

    `what` prefixes every message ("load x.tar: layer sha256:ab12…"); `warn`
    is called with one-line warnings. Raises UserError for hostile or broken
    input; `dest` is then left half-filled for the caller to remove.
    """
    tail = _Tail(tar_stream)
    unpacker = _Unpacker(dest, what, warn)
    last = "(start of the layer)"
    try:
        try:
            tf = tarfile.open(fileobj=tail, mode="r|", errorlevel=2)
        except tarfile.ReadError as e:
            if tail.pos == 0:
                return unpacker.stats  # a zero-byte blob: an empty layer
            raise UserError(f"{what}: not a tar archive ({e})") from None
        try:
            while True:
                ti = tf.next()
                if ti is None:
                    break
                tf.members.clear()  # stream mode needs no member list; save memory
                last = f'entry "{ti.name}"'
                if ti.issparse():
                    raise UserError(f'{what}: entry "{ti.name}" is a sparse file (unsupported)')
                try:
                    unpacker.entry(tf, ti)
                except OSError as e:
                    raise UserError(f'{what}: entry "{ti.name}": {e.strerror}') from None
                if progress:
                    progress.tick()
            unpacker.finish_dirs()
        except tarfile.TarError as e:
            raise UserError(f"{what}: malformed tar after {last}: {e}") from None
        except OSError as e:
            raise UserError(f"{what}: {e.strerror or e}") from None
        _check_end(tail, tf.offset, what, last)
    finally:
        unpacker.close()
    return unpacker.stats


def _check_end(tail: _Tail, end_offset: int, what: str, last: str):
    """tarfile silently stops at a header it cannot parse; accept the end only
    if everything from there to EOF is zeros (end-of-archive blocks, padding)."""
    unread_in_tail = tail.pos - end_offset
    if unread_in_tail > len(tail.tail):
        raise UserError(f"{what}: malformed tar after {last}")
    rest = bytes(tail.tail[len(tail.tail) - unread_in_tail:]) if unread_in_tail > 0 else b""
    while True:
        if rest.strip(b"\0"):
            raise UserError(f"{what}: malformed tar: unreadable header after {last}")
        rest = tail.read(1 << 20)
        if not rest:
            return
