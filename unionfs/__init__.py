"""unionfs: a pure-Python union (copy-on-write) filesystem on FUSE.

The public Python API (everything else in the package is internal)::

    unionfs.mount(lowers, upper=None, work=None, mountpoint=None, **options) -> Mount
    unionfs.Mount          .path .upper .lowers .changes() .unmount(); a context manager
    unionfs.Change         one ``unionfs diff`` line: .kind ("A", "C", "D"), .path
    unionfs.images.Store   load, images, mount, commit, save, push, pull, run
    unionfs.UnionfsError   base of MountError (FuseUnavailableError), UnmountError, ImageError,
                           ContainerError

``import unionfs`` stays cheap (every ``unionfs`` and ``fuse-unionfs`` start
imports it): the API's modules load on first use.
"""

import sys

from unionfs.errors import (
    ContainerError, FuseUnavailableError, ImageError, MountError, UnionfsError, UnmountError)

__version__ = "0.1.0"

TYPE_CHECKING = False       # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from unionfs import images
    from unionfs.api import Change, Mount, mount

__all__ = ["Change", "ContainerError", "FuseUnavailableError", "ImageError", "Mount", "MountError",
           "UnionfsError", "UnmountError", "images", "mount"]

_LAZY = {"mount": "unionfs.api", "Mount": "unionfs.api", "Change": "unionfs.api"}


def __getattr__(name: str):
    # Asked for every submodule a ``from unionfs import NAME`` loads for the
    # first time, so a miss must cost nothing: importlib (with warnings,
    # ~0.5 ms of every command's start) is not loaded to say no.
    if name not in _LAZY and name != "images":
        raise AttributeError(f"module 'unionfs' has no attribute {name!r}")
    from importlib import import_module
    value = import_module(_LAZY.get(name, "unionfs.images"))
    if name in _LAZY:
        value = getattr(value, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from types import ModuleType as _ModuleType
else:
    _ModuleType = type(sys)     # types.ModuleType, without importing types


class _Package(_ModuleType):
    """``unionfs.mount`` is the public function, while the CLI's internal
    module of the same name (unionfs/mount.py) is imported as
    ``from unionfs.mount import ...``: loading that module must not replace
    the function on the package, as the import system otherwise would."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "mount" and isinstance(value, _ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
