"""``fuse-unionfs``: fuse-overlayfs's command line, for container engines
that run it as their ``mount_program`` (DESIGN.md §2).

Kept apart from cli.py so that a mount loads neither argparse nor the
subcommands' modules: a container engine waits for this program on every
container start (see docs/PERFORMANCE.md, "Start-up").
"""

import os
import sys

from unionfs import __version__
from unionfs.errors import EXIT_OK, EXIT_USAGE, report_errors

PROG = "fuse-unionfs"
USAGE = "usage: fuse-unionfs [-f] [-d|--debug] [-o OPTS] [SOURCE] MOUNTPOINT"


def _warn(msg):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def exit_after_mount(code):
    """End this program once its mount is made and its daemon runs on:
    without the interpreter's teardown (freeing every module and object:
    ~4 ms of CPU, which a container engine waits for). Only for the program
    itself, never when called from Python."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None):
    """fuse-overlayfs's command line: ``[-f] [--debug] [-o OPTS]... [SOURCE] MNT``.

    Options may come before or after the positionals (mount.fuse puts them
    last), as ``-o OPTS`` or ``-oOPTS``.
    """
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    opts, positional = [], []
    foreground = debug = False
    it = iter(argv)
    for a in it:
        if a == "-o":
            opts.append(next(it, ""))
        elif a.startswith("-o"):
            opts.append(a[2:])
        elif a == "-f":
            foreground = True
        elif a in ("-d", "--debug"):
            debug = True
        elif a == "-s":
            pass                    # single-threaded: ours is safe either way
        elif a in ("--version", "-V"):
            from unionfs import binding
            print(f"fuse-unionfs: version {__version__}")
            try:
                print("\n".join(binding.load().describe()))
            except (OSError, ImportError, ValueError) as e:
                print(f"FUSE library: none ({e})")
            return EXIT_OK
        elif a in ("-h", "--help"):
            print(USAGE)
            return EXIT_OK
        elif a.startswith("-") and a != "-":
            print(f"fuse-unionfs: unknown argument {a!r}\n{USAGE}", file=sys.stderr)
            return EXIT_USAGE
        else:
            positional.append(a)
    if len(positional) not in (1, 2):
        print(f"fuse-unionfs: expected [SOURCE] MOUNTPOINT\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE

    def run():
        from unionfs.mount import mount, parse_options
        spec = parse_options(opts, strict=False, warn=_warn)
        mount(spec, positional[-1], foreground=foreground, debug=debug)
        return EXIT_OK
    code = report_errors(PROG, run)
    if as_program and code == EXIT_OK and not (foreground or debug):
        exit_after_mount(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
