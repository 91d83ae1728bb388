"""Errors a user can cause, and the exit codes the command line returns.

A `UserError` is reported as one line on stderr (``unionfs: <message>``) and
never as a traceback; everything else is a bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_ERROR = 1      # the operation failed (bad input, nothing mounted, ...)
EXIT_USAGE = 2      # the command line itself is wrong (argparse uses 2 too)


class UserError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    exit_code = EXIT_ERROR
