"""pytest fixtures for throw-away copy-on-write views: ``union_mount`` and
``image_rootfs``.

The plugin is on whenever unionfs is installed (the ``pytest11`` entry point
``unionfs``); ``-p no:unionfs`` turns it off (and ``-p unionfs`` on, where
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` is set). It is on rather than opt-in
because it costs nothing until a test asks for one of its fixtures: loading
it imports neither FUSE nor the image code, and it changes nothing about a
test run (no options, hooks or signal handlers) until a mount exists.

    def test_build(union_mount, tmp_path):
        m = union_mount([fixture_tree])          # a unionfs.Mount
        ...                                      # change m.path freely
        assert [str(c) for c in m.changes()] == ["A /out"]

Every mount a fixture makes is unmounted at the test's teardown, whether the
test passed, failed or was interrupted (Ctrl-C: pytest tears down as usual;
SIGTERM, which would kill pytest outright: while mounts exist, a handler
unmounts them and then lets the signal take its course). A mount that is
still busy at teardown is detached lazily and reported as a teardown error.
Where FUSE cannot be used (no /dev/fuse, not accessible to this user, no
libfuse, no fusermount3 for an unprivileged user) the test is skipped with
that reason; every other failure to mount is a test error.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from unionfs.api import Mount, StrPath
    from unionfs.images import Store

# Signals that end pytest without a teardown; SIGINT is pytest's own
# KeyboardInterrupt, after which it tears down.
_FATAL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def fuse_unavailable_reason() -> str | None:
    """Why this process cannot make a FUSE mount, or None if it can (as far
    as can be told without mounting; libfuse itself is checked by mounting)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return f"/dev/fuse is not readable and writable by uid {os.getuid()}"
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 is missing (an unprivileged FUSE mount needs it): install fuse3"
    return None


class _LiveMounts:
    """Mounts made by the fixtures and not yet unmounted, so that a fatal
    signal can unmount them; the handlers exist only while there are some."""

    def __init__(self):
        self._mounts: list[Mount] = []
        self._previous: dict[int, Any] = {}       # signal -> the handler we replaced
        self._lock = threading.Lock()

    def add(self, m: Mount) -> None:
        with self._lock:
            self._mounts.append(m)
            if threading.current_thread() is threading.main_thread() and not self._previous:
                for sig in _FATAL_SIGNALS:
                    previous = signal.signal(sig, self._on_signal)
                    # None: a handler installed from C, which Python cannot restore
                    self._previous[sig] = signal.SIG_DFL if previous is None else previous

    def discard(self, m: Mount) -> None:
        with self._lock:
            if m in self._mounts:
                self._mounts.remove(m)
            if not self._mounts and threading.current_thread() is threading.main_thread():
                self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:    # else someone replaced ours: keep theirs
                signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        for m in reversed(self._mounts):
            release(m)
        self._mounts.clear()
        self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)     # the default action, now the mounts are gone


_live = _LiveMounts()


def release(m: Mount) -> str | None:
    """Unmount ``m``; if it is busy, detach it lazily. Returns why it could
    not simply be unmounted, or None."""
    from unionfs.errors import UnmountError
    try:
        m.unmount()
        return None
    except UnmountError as e:
        problem = str(e)
    try:
        m.detach()
    except UnmountError as e:
        problem += f"; {e}"
    return problem


class _Mounts:
    """The mounts one test made, released at its teardown (newest first)."""

    def __init__(self):
        self.made: list[Mount] = []

    def add(self, m: Mount) -> Mount:
        self.made.append(m)
        _live.add(m)
        return m

    def release_all(self) -> None:
        problems = []
        while self.made:
            m = self.made.pop()
            try:
                problem = release(m)
            finally:
                _live.discard(m)
            if problem:
                problems.append(f"{problem}; detached lazily")
        if problems:
            pytest.fail("unionfs mounts still in use at teardown:\n" + "\n".join(problems),
                        pytrace=False)


def _skip_without_fuse() -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def _unionfs_mounts() -> Iterator[_Mounts]:
    mounts = _Mounts()
    try:
        yield mounts
    finally:
        mounts.release_all()


@pytest.fixture
def union_mount(_unionfs_mounts: _Mounts):
    """Factory: ``union_mount([lower, ...], upper=None, work=None,
    mountpoint=None, **options)`` mounts as `unionfs.mount` does (temporary
    upper, work dir and mount point unless given) and returns the
    `unionfs.Mount`, unmounted at teardown."""
    from unionfs.errors import FuseUnavailableError

    def make(lowers: StrPath | list[StrPath], upper: StrPath | None = None,
             work: StrPath | None = None, mountpoint: StrPath | None = None,
             **options: object) -> Mount:
        import unionfs
        _skip_without_fuse()
        try:
            m = unionfs.mount(lowers, upper, work, mountpoint, **options)
        except FuseUnavailableError as e:
            pytest.skip(str(e))
        return _unionfs_mounts.add(m)
    return make


class _ArchiveStore:
    """One store per test session (per xdist worker) for the images that
    ``image_rootfs`` loads from archives, each archive loaded once."""

    def __init__(self, path: StrPath):
        from unionfs.images import Store
        self.store = Store(path)
        self._loaded: dict[str, str] = {}      # archive's real path -> image ID

    def image_id(self, archive: StrPath) -> str:
        key = os.path.realpath(archive)
        if key not in self._loaded:
            self._loaded[key] = self.store.load(key)[0].id
        return self._loaded[key]


@pytest.fixture(scope="session")
def _unionfs_archive_store(tmp_path_factory: pytest.TempPathFactory) -> _ArchiveStore:
    return _ArchiveStore(tmp_path_factory.mktemp("unionfs-store"))


@pytest.fixture
def image_rootfs(_unionfs_mounts: _Mounts, _unionfs_archive_store: _ArchiveStore):
    """Factory: ``image_rootfs(image, store=None, name=None)`` mounts an
    image as a container rootfs and returns the `unionfs.Mount` (``.path``
    is the rootfs; ``.changes()`` what the test changed in it).

    ``image`` is a path to an archive or OCI layout (``docker save`` tar,
    OCI dir or tar), loaded once per session into a private store, or an
    image name in ``store`` (a path or `unionfs.images.Store`; default the
    user's store, as ``unionfs image``). The container is removed at
    teardown."""
    from unionfs.errors import FuseUnavailableError
    from unionfs.images import Store

    def make(image: StrPath, store: StrPath | Store | None = None, name: str | None = None) -> Mount:
        _skip_without_fuse()
        if store is None and os.path.exists(image):
            ref = _unionfs_archive_store.image_id(image)
            store = _unionfs_archive_store.store
        else:
            store = store if isinstance(store, Store) else Store(store)
            ref = os.fspath(image)
        try:
            m = store.mount(ref, name=name, remove=True)
        except FuseUnavailableError as e:
            pytest.skip(str(e))
        return _unionfs_mounts.add(m)
    return make
