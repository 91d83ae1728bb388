"""What ``unionfs.mount(...)`` returns: a live union mount as a Python object.

A `Mount` is made by the code ``unionfs mount`` runs (options parsed by
`unionfs.mount.parse_options`, validated and daemonised by
`unionfs.mount.mount`), read by the code ``unionfs diff`` runs
(`unionfs.image.changes.diff`) and unmounted by the code ``unionfs umount``
runs; this module only adds temporary directories and the object around them.
Errors are the CLI's, narrowed to `MountError` / `UnmountError`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Union, cast

from unionfs.errors import MountError, UnionfsError, UnmountError

StrPath = Union[str, "os.PathLike[str]"]

# Given as arguments of mount(), never as options.
_LAYER_OPTIONS = ("lowerdir", "upperdir", "workdir")


ChangeKind = Literal["A", "C", "D"]


@dataclass(frozen=True)
class Change:
    """One line of ``unionfs diff``: ``kind`` is ``"A"`` (added), ``"C"``
    (changed) or ``"D"`` (deleted); ``path`` is absolute in the merged view.
    ``str(change)`` is the line as ``unionfs diff`` prints it."""

    kind: ChangeKind
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


class Mount:
    """A live union mount. Use it as a context manager (it unmounts at the
    end of the ``with`` block; after an exception, a mount the block left
    busy is detached lazily so the exception is not hidden) or call `unmount`.

    ``path`` is the mount point (the merged view), ``lowers`` the read-only
    layers (top first), ``upper`` and ``work`` the writable layer and its
    scratch dir; ``name`` is the container's name for an image mount.
    Directories the API created (temporary upper, work, mount point) are
    removed at unmount.
    """

    def __init__(self, path: str, lowers: list[str], upper: str | None, work: str | None, *,
                 pid: int | None = None, name: str | None = None,
                 cleanup: Iterable[Callable[[], None]] = ()):
        self.path = path
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.name = name
        self._pid = pid
        self._cleanup = list(cleanup)
        self._unmounted = False

    def __repr__(self) -> str:
        state = "unmounted" if self._unmounted else "mounted"
        return f"<unionfs.Mount {self.path} ({state})>"

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.unmount()
            return
        # The block failed: what it left open (often a file its traceback's
        # frames still hold) must not turn its exception into an UnmountError.
        try:
            self.unmount()
        except UnmountError:
            self.detach()

    @property
    def mounted(self) -> bool:
        """True until `unmount` (or an outside ``unionfs umount``) removed it."""
        return not self._unmounted and is_mounted(self.path)

    def changes(self) -> list[Change]:
        """What the upper adds, changes and deletes relative to the lowers,
        sorted by path: exactly the lines ``unionfs diff`` prints."""
        from unionfs.image.changes import diff
        if self.upper is None:
            return []
        if not os.path.isdir(self.upper):
            raise UnionfsError(f"{self.path}: unmounted, and its temporary upper dir is gone")
        return [Change(cast(ChangeKind, kind), path) for kind, path in diff(self.upper, self.lowers)]

    def unmount(self) -> None:
        """Unmount and wait for the daemon to exit, then remove what the API
        created. Calling it again does nothing. Raises `UnmountError` (with
        ``unionfs umount``'s message) if the mount stays, e.g. when busy."""
        if self._unmounted:
            return
        error = None
        if is_mounted(self.path):
            from unionfs.mount import umount
            try:
                umount(self.path)
            except UnionfsError as e:
                if is_mounted(self.path):
                    raise UnmountError(str(e)) from None
                error = e           # gone all the same (its daemon had died)
        self._unmounted = True
        self._reap()
        while self._cleanup:
            self._cleanup.pop()()
        if error is not None:
            raise UnmountError(str(error)) from None

    def detach(self) -> None:
        """Last resort when `unmount` fails because the mount is busy: detach
        it lazily (``umount -l``); the daemon exits once nothing uses it."""
        if self._unmounted:
            return
        detach(self.path)
        self._unmounted = True
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except OSError:
                pass        # still in use through the detached mount

    def _reap(self) -> None:
        """Collect the exited daemon (our child: the fork in unionfs.mount)."""
        if self._pid is not None:
            try:
                os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                pass        # not ours to reap (made in another process)
            self._pid = None


def is_mounted(path: str) -> bool:
    """True if something is mounted at ``path`` (by /proc/self/mountinfo)."""
    from unionfs.mount import _mount_entry
    return _mount_entry(path) is not None


def detach(path: str) -> None:
    """Lazily unmount whatever is mounted at ``path``, if anything."""
    if not is_mounted(path):
        return
    cmd = (["umount", "-l"] if os.geteuid() == 0 else ["fusermount", "-u", "-z"]) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and is_mounted(path):
        raise UnmountError(f"detaching {path} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


@contextmanager
def narrowed(error: type[UnionfsError]) -> Iterator[None]:
    """Re-raise the CLI's errors (`UnionfsError`) as ``error``, same message."""
    try:
        yield
    except error:
        raise
    except UnionfsError as e:
        raise error(str(e)) from None


def remove_tree(path: str) -> None:
    from unionfs.image.store import rmtree
    rmtree(path)


def option_items(options: dict[str, object]) -> list[str]:
    """``-o`` items from keyword options: ``ro=True`` -> ``ro``,
    ``whiteout="oci"`` -> ``whiteout=oci``; False and None leave one out."""
    items = []
    for key, value in options.items():
        if key in _LAYER_OPTIONS:
            raise MountError(f"{key}: pass it as an argument, not as an option")
        if value is None or value is False:
            continue
        item = key if value is True else f"{key}={value}"
        if "," in item:
            raise MountError(f"option {item!r}: a value may not contain ','")
        items.append(item)
    return items


def _mount_spec(spec, mountpoint: str, cleanup: list[Callable[[], None]]) -> Mount:
    """Mount ``spec`` (a `unionfs.mount.MountSpec`) as ``unionfs mount``
    does and return the `Mount`. On any failure ``cleanup`` runs, nothing
    stays mounted, and a `MountError` carries the CLI's message."""
    from unionfs.mount import mount as daemon_mount
    try:
        with narrowed(MountError):
            pid = daemon_mount(spec, mountpoint)
    except BaseException:
        detach(mountpoint)      # interrupted while the daemon was starting: it may have mounted
        for undo in reversed(cleanup):
            undo()
        raise

    def absolute(d: str | None) -> str | None:
        return None if d is None else os.path.abspath(d)
    return Mount(os.path.realpath(mountpoint), [os.path.abspath(d) for d in spec.lowerdirs],
                 absolute(spec.upperdir), absolute(spec.workdir), pid=pid, cleanup=cleanup)


def mount(lowers: StrPath | Iterable[StrPath], upper: StrPath | None = None,
          work: StrPath | None = None, mountpoint: StrPath | None = None,
          **options: object) -> Mount:
    """Mount a union of ``lowers`` (top-most first, as ``lowerdir=TOP:...``)
    and return the live `Mount`, as ``unionfs mount`` would.

    Without ``upper`` and ``work`` a temporary upper and work dir are made,
    without ``mountpoint`` a temporary mount point; those are removed at
    unmount. ``options`` are ``unionfs mount -o`` options as keywords:
    ``ro=True``, ``whiteout="oci"``, ``volatile=True``, ``timeout=0`` ...

    Raises `MountError` (`FuseUnavailableError` where FUSE cannot be used)
    with the CLI's one-line message; nothing is then left mounted or created.
    """
    from unionfs.mount import parse_options
    if isinstance(lowers, (str, os.PathLike)):
        lowers = [lowers]
    lower_dirs = [os.fspath(d) for d in lowers]     # as given: errors name them so
    with narrowed(MountError):
        spec = parse_options(option_items(options), strict=True, lowerdirs=lower_dirs)
    cleanup: list[Callable[[], None]] = []
    try:
        if upper is None and work is None:
            scratch = tempfile.mkdtemp(prefix="unionfs-")
            cleanup.append(lambda: remove_tree(scratch))
            upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
            os.mkdir(upper, 0o755)
            os.mkdir(work, 0o700)
        if mountpoint is None:
            temp_mountpoint = mountpoint = tempfile.mkdtemp(prefix="unionfs-mnt-")
            cleanup.append(lambda: os.rmdir(temp_mountpoint))
    except OSError as e:
        for undo in reversed(cleanup):
            undo()
        raise MountError(f"cannot create a temporary directory: {e.strerror}") from None
    spec.upperdir = None if upper is None else os.fspath(upper)
    spec.workdir = None if work is None else os.fspath(work)
    return _mount_spec(spec, os.fspath(mountpoint), cleanup)


__all__ = ["Change", "Mount", "mount"]
