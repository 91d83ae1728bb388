"""Command line: ``unionfs`` (argparse subcommands). ``fuse-unionfs``
(fuse-overlayfs's argv) is fuse_cli.py's. User errors end as one line on
stderr."""

import sys

from unionfs import __version__
from unionfs.errors import EXIT_OK, EXIT_USAGE, report_errors
from unionfs.fuse_cli import exit_after_mount
from unionfs.fuse_cli import main as fuse_main  # noqa: F401  (fuse-unionfs's old entry point)

PROG = "unionfs"


def _parser_class():
    """argparse's parser, but a usage error is one line (no usage dump).
    Made when needed: a plain ``unionfs mount`` does without (_plain_mount)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")
    return _Parser


def cmd_mount(args):
    from unionfs.mount import mount, parse_options
    spec = parse_options(args.options or [], strict=True, warn=_warn)
    mount(spec, args.mountpoint, foreground=args.foreground, debug=args.debug)
    return EXIT_OK


def cmd_umount(args):
    from unionfs.mount import umount
    umount(args.mountpoint)
    return EXIT_OK


# Commands whose parser needs no other module: `unionfs mount` (the start
# of a container) does not load the modules of every other subcommand.
CORE_COMMANDS = ("mount", "umount")


def build_parser(core_only=False):
    _Parser = _parser_class()
    p = _Parser(prog=PROG, description="Union (copy-on-write) filesystem on FUSE, "
                "and a container image tool.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    m = sub.add_parser("mount", help="mount a union of directories")
    m.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="lowerdir=TOP:...:BOTTOM[,upperdir=DIR,workdir=DIR]"
                        "[,whiteout=overlay|oci|auto] and FUSE options")
    m.add_argument("-f", dest="foreground", action="store_true",
                   help="stay in the foreground")
    m.add_argument("--debug", action="store_true",
                   help="log every FUSE request (implies -f)")
    m.add_argument("mountpoint")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount)
    if core_only:
        return p

    try:
        from unionfs.image import commands as image_commands
    except ImportError:
        image_commands = None
    if image_commands is not None:
        image_commands.register(sub)
    from unionfs.registry import commands as registry_commands
    registry_commands.register(sub)
    from unionfs.watch import register as register_watch   # which, events, stats
    register_watch(sub)
    from unionfs.container import commands as container_commands
    container_commands.register(sub)
    return p


def _warn(msg):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


class _MountArgs:
    func = staticmethod(cmd_mount)

    def __init__(self, options, foreground, debug, mountpoint):
        self.options = options
        self.foreground = foreground
        self.debug = debug
        self.mountpoint = mountpoint


def _plain_mount(argv):
    """``mount [-o OPTS | -oOPTS]... [-f] [--debug] MOUNTPOINT``, parsed
    without argparse (which loads re, gettext, locale and shutil: ~8 ms of
    every mount's start); None for anything else (help, usage errors, ``--``,
    abbreviations, ...), which argparse parses, with its messages."""
    if argv[:1] != ["mount"]:
        return None
    options, positional = [], []
    foreground = debug = False
    it = iter(argv[1:])
    for a in it:
        if a == "-o":
            value = next(it, None)
            if value is None or value.startswith("-"):
                return None
            options.append(value)
        elif a.startswith("-o") and a[2] != "=":
            options.append(a[2:])
        elif a == "-f":
            foreground = True
        elif a == "--debug":
            debug = True
        elif a.startswith("-") or positional:
            return None
        else:
            positional.append(a)
    if not positional:
        return None
    return _MountArgs(options or None, foreground, debug, positional[0])


def main(argv=None):
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = _plain_mount(argv)
    if args is None:
        args = build_parser(core_only=argv[:1] in [[c] for c in CORE_COMMANDS]).parse_args(argv)
    code = report_errors(PROG, args.func, args)
    if as_program and code == EXIT_OK and args.func is cmd_mount and not (
            args.foreground or args.debug):
        exit_after_mount(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
