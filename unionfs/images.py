"""The image store from Python: ``unionfs.images.Store``.

Each method runs the function the matching ``unionfs`` subcommand runs
(`unionfs.image.commands`), without its printing; errors carry the CLI's
one-line messages as `ImageError` (or `MountError` for `Store.mount`).

``push``, ``pull`` and ``run`` are not here yet: they are being written for
the command line, and join this class once they exist there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Literal

from unionfs.api import Mount, StrPath, detach, narrowed
from unionfs.errors import ImageError, MountError
from unionfs.image import commands
from unionfs.image.progress import Progress
from unionfs.image.store import Image, default_store_path
from unionfs.image.store import Store as _Store

__all__ = ["Image", "Store"]


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
