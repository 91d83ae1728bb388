"""Errors a user can cause, and the exit codes the command line returns.

Every such error is a `UnionfsError`: the command line reports it as one line
on stderr (``unionfs: <message>``) and exits with its ``exit_code``, never with
a traceback; everything else is a bug and keeps its traceback. The Python API
raises the same errors, with the same messages, as these subclasses:

    UnionfsError                 str(e) is the CLI's one-line message
    ├── MountError               nothing was mounted (bad layer, option, ...)
    │   └── FuseUnavailableError this machine (or user) cannot mount FUSE
    ├── UnmountError             the mount is still there (e.g. busy)
    ├── ImageError               an image store operation failed (push, pull too)
    └── ContainerError           a container could not be created or started

Internal code raises `UserError` (the same class as `UnionfsError`); the API
narrows it to a subclass where it knows which operation failed.
"""

import sys

EXIT_OK = 0
EXIT_ERROR = 1      # the operation failed (bad input, nothing mounted, ...)
EXIT_USAGE = 2      # the command line itself is wrong (argparse uses 2 too)


class UnionfsError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    exit_code = EXIT_ERROR


# The name the code base raises; one class, so the CLI's handling is unchanged.
UserError = UnionfsError


class MountError(UnionfsError):
    """A union or image could not be mounted; nothing is left mounted."""


class FuseUnavailableError(MountError):
    """No usable FUSE here: /dev/fuse missing or not accessible, or no libfuse."""


class UnmountError(UnionfsError):
    """Unmounting failed (for example the mount is busy); it is still mounted."""


class ImageError(UnionfsError):
    """An image store operation (load, mount, commit, save, ...) failed."""


class ContainerError(UnionfsError):
    """A container could not be created or started (a bad option, no usable
    runtime, a command that is not in the image); nothing is left of it."""


def report_errors(prog, func, *args):
    """``func(*args)``, a command's body, and its exit code: a UserError is
    one line ``PROG: message`` on stderr and its exit code; Ctrl-C is 130."""
    try:
        return func(*args)
    except UserError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
