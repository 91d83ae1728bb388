"""The image store from Python: ``unionfs.images.Store``.

Each method runs the function the matching ``unionfs`` subcommand runs
(`unionfs.image.commands`, `unionfs.registry.commands`,
`unionfs.container.commands`), without its printing; errors carry the CLI's
one-line messages as `ImageError` (`MountError` for `Store.mount`,
`ContainerError` for a container `Store.run` could not create or start).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from unionfs.api import Mount, StrPath, detach, narrowed
from unionfs.errors import ContainerError, ImageError, MountError
from unionfs.image import commands
from unionfs.image.progress import Progress
from unionfs.image.store import Image, default_store_path
from unionfs.image.store import Store as _Store

__all__ = ["Image", "RunResult", "Store"]


@dataclass(frozen=True)
class RunResult:
    """What `Store.run` ran: the container's exit status (as ``unionfs run``
    exits: 0-255, 128+N for a signal N) and its output, stdout and stderr
    interleaved as written (the container's log, UTF-8 decoded)."""
    exit_code: int
    output: str
    name: str       # the container's (removed again unless run with rm=False)


@contextlib.contextmanager
def _authfile(path: StrPath | None) -> Iterator[None]:
    """``--authfile``: $REGISTRY_AUTH_FILE meanwhile, as the CLI sets it."""
    if path is None:
        yield
        return
    from unionfs.registry.auth import ENV_AUTH_FILE
    saved = os.environ.get(ENV_AUTH_FILE)
    os.environ[ENV_AUTH_FILE] = os.fspath(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_AUTH_FILE, None)
        else:
            os.environ[ENV_AUTH_FILE] = saved


class Store:
    """A local image store: ``path``, else ``$UNIONFS_STORE``, else
    ``/var/lib/unionfs`` (root) or ``~/.local/share/unionfs``, as ``--store``.

    Images are `Image` objects (``.id``, the config digest; ``.names``; and
    ``.layers``); wherever an image is asked for, a name (``busybox``,
    ``busybox:1.36``), an image ID or a unique ID prefix is accepted, as on
    the command line.
    """

    def __init__(self, path: StrPath | None = None):
        self._store = _Store(os.fspath(path) if path is not None else default_store_path())
        self.path = self._store.root

    def __repr__(self) -> str:
        return f"<unionfs.images.Store {self.path}>"

    def _progress(self) -> Progress:
        return Progress(quiet=True)     # warnings still go to stderr

    def load(self, path: StrPath, tag: str | None = None) -> list[Image]:
        """Load a ``docker save`` archive or an OCI layout (dir or tar), as
        ``unionfs image load [--tag TAG]``; returns the images loaded."""
        with narrowed(ImageError):
            loaded = commands.load_images(self._store, os.fspath(path), tag, self._progress())
        return [image for image, _ in loaded]

    def images(self) -> list[Image]:
        """Every image in the store, as ``unionfs image ls`` lists them."""
        with narrowed(ImageError):
            return self._store.images()

    def image(self, ref: str) -> Image:
        """The image named (or with the ID) ``ref``."""
        with narrowed(ImageError):
            return self._store.resolve(ref)

    def mount(self, image: str, mountpoint: StrPath | None = None, name: str | None = None,
              remove: bool = False) -> Mount:
        """Mount ``image`` as a container's rootfs, as ``unionfs image mount``:
        a new container (named ``name``, or after the image) or the container
        ``name`` remounted. Without ``mountpoint`` a temporary one is made and
        removed at unmount. The container (its upper) stays in the store after
        unmount, for `commit`, unless ``remove`` is true (then it is removed
        at unmount, an existing container ``name`` too, as ``unionfs rm``).

        Raises `ImageError` for an unknown image, `MountError` if mounting
        fails (a container made for it is then removed again)."""
        self.image(image)       # an unknown image is an ImageError, not a MountError
        cleanup: list[Callable[[], None]] = []
        if mountpoint is None:
            temp_mountpoint = mountpoint = tempfile.mkdtemp(prefix="unionfs-mnt-")
            cleanup.append(lambda: os.rmdir(temp_mountpoint))
        mnt = os.fspath(mountpoint)
        try:
            with narrowed(MountError):
                container, spec, pid = commands.mount_image(self._store, image, mnt, name)
        except BaseException:
            detach(mnt)         # interrupted while the daemon was starting: it may have mounted
            for undo in reversed(cleanup):
                undo()
            raise
        if remove:
            def remove_container(c=container):
                with self._store.locked():
                    self._store.remove_container(c)
            cleanup.insert(0, remove_container)
        return Mount(os.path.realpath(mnt), list(spec.lowerdirs), spec.upperdir, spec.workdir,
                     pid=pid, name=container.name, cleanup=cleanup)

    def commit(self, container_or_mount: str | Mount, ref: str, message: str | None = None) -> Image:
        """Store a container's changes as a new image named ``ref``, as
        ``unionfs commit``: the container by name or mount point, or the
        `Mount` that `mount` returned (mounted or not)."""
        if isinstance(container_or_mount, Mount):
            if container_or_mount.name is None:
                raise ImageError(f"commit {container_or_mount.path}: not a container mount "
                                 "(made by Store.mount)")
            target = container_or_mount.name
        else:
            target = os.fspath(container_or_mount)
        with narrowed(ImageError):
            return commands.commit_container(self._store, target, ref, message, self._progress())

    def save(self, image: str, path: StrPath, format: Literal["docker", "oci"] = "docker") -> None:
        """Write ``image`` to the file ``path``, as ``unionfs image save``:
        ``docker`` (docker load, skopeo docker-archive:) or ``oci`` (an OCI
        layout tar: skopeo oci-archive:, umoci)."""
        with narrowed(ImageError):
            commands.save_image(self._store, image, os.fspath(path), format, self._progress())

    def push(self, image: str, dest: str | None = None, tls_verify: bool = True,
             cert_dir: StrPath | None = None, authfile: StrPath | None = None,
             format: Literal["oci", "docker"] = "oci") -> str:
        """Push ``image`` to ``dest`` (``REGISTRY/REPO[:TAG]``; default the
        image's own name, which must name a registry), as ``unionfs push``;
        returns the manifest digest. ``tls_verify=False`` also allows plain
        http; ``cert_dir`` and ``authfile`` as ``--cert-dir``, ``--authfile``
        (default: the credentials ``unionfs login`` stored)."""
        from unionfs.registry.commands import push_image
        with narrowed(ImageError), _authfile(authfile):
            return push_image(self._store, image, dest, format, tls_verify,
                              os.fspath(cert_dir) if cert_dir is not None else None, self._progress())

    def pull(self, ref: str, platform: str | None = None, tls_verify: bool = True,
             cert_dir: StrPath | None = None, authfile: StrPath | None = None) -> Image:
        """Pull ``ref`` (``REGISTRY/REPO[:TAG|@DIGEST]``) into the store, as
        ``unionfs pull``; ``platform`` (``OS/ARCH[/VARIANT]``) picks from a
        multi-platform index (default: this machine's). Returns the image;
        the other options as for `push`."""
        from unionfs.registry.commands import pull_image
        with narrowed(ImageError), _authfile(authfile):
            return pull_image(self._store, ref, platform, tls_verify,
                              os.fspath(cert_dir) if cert_dir is not None else None, self._progress())

    def run(self, image: str, command: Sequence[str] | None = None, *, rm: bool = True,
            **options) -> RunResult:
        """Run ``command`` (default: the image's) in a new container of
        ``image`` until it exits, as ``unionfs run --rm``, and return its
        exit status and output. A failing command is a `RunResult` with its
        exit status, not an exception. ``options`` are ``run``'s by their
        long names: ``name``, ``env=["K=V"]``, ``env_file``, ``volume``,
        ``workdir``, ``user``, ``hostname``, ``entrypoint``, ``network``,
        ``publish``, ``read_only``, ``runtime``. With ``rm=False`` the
        exited container stays in the store (for `commit`, ``unionfs rm``).

        Raises `ImageError` for an unknown image and `ContainerError` when
        the container cannot be created or started (bad option, no runtime,
        a command not in the image): then nothing is left of it."""
        from unionfs.container import lifecycle, record
        from unionfs.container.commands import create_container, run_args, start_created
        for unsupported in ("detach", "interactive", "tty"):
            if options.get(unsupported):
                raise TypeError(f"run(): {unsupported} is not supported (the output is collected)")
        # Detached, as `run -d`: the output goes to the container's log, and
        # this process's stdio and signal handlers stay its own.
        args = run_args(image, list(command) if command is not None else None,
                        **{**options, "detach": True, "rm": False})
        self.image(image)       # an unknown image is an ImageError
        with narrowed(ContainerError):
            c = create_container(self._store, args)
            start_created(self._store, c, attach=False)
        daemon = _daemon_pid(record.rootfs_path(c))
        try:
            st = record.read_state(c)
            record.wait_gone(st, float("inf"))
            _reap(int(st.monitor.split()[0]) if st.monitor else None)
            st = lifecycle.refresh(self._store, c)
            try:
                with open(record.log_path(c), "rb") as f:
                    output = f.read().decode(errors="replace")
            except FileNotFoundError:
                output = ""
        finally:
            if rm:
                with narrowed(ContainerError):
                    lifecycle.remove(self._store, c, force=True)
            _reap(daemon)       # unmounted when the container exited (or by the remove)
        return RunResult(st.exit_code if st.exit_code is not None else record.EXIT_UNKNOWN, output, c.name)


def _daemon_pid(mountpoint: str) -> int | None:
    """The pid of the unionfs daemon serving ``mountpoint`` (its pidfile)."""
    from unionfs.mount import pidfile_for
    try:
        with open(pidfile_for(mountpoint)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _reap(pid: int | None) -> None:
    """Collect the exit status of ``pid`` if it is an exited child of this
    process (the run's monitor, its rootfs daemon: forks made by the run),
    else a zombie would stay."""
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
