"""Command line: ``unionfs`` (argparse subcommands) and ``fuse-unionfs``
(fuse-overlayfs's argv). User errors end as one line on stderr."""

import argparse
import sys

from unionfs import __version__
from unionfs.container import commands as container_commands
from unionfs.errors import EXIT_OK, EXIT_USAGE, UserError

PROG = "unionfs"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def cmd_mount(args):
    from unionfs.mount import mount, parse_options
    spec = parse_options(args.options or [], strict=True, warn=_warn)
    mount(spec, args.mountpoint, foreground=args.foreground, debug=args.debug)
    return EXIT_OK


def cmd_umount(args):
    from unionfs.mount import umount
    umount(args.mountpoint)
    return EXIT_OK


def build_parser():
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
    container_commands.register(sub)
    return p


def _warn(msg):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def _run(func, args):
    try:
        return func(args)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def main(argv=None):
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


# -- fuse-unionfs ---------------------------------------------------------------

FUSE_USAGE = "usage: fuse-unionfs [-f] [-d|--debug] [-o OPTS] [SOURCE] MOUNTPOINT"


def fuse_main(argv=None):
    """fuse-overlayfs's command line: ``[-f] [--debug] [-o OPTS]... [SOURCE] MNT``.

    Options may come before or after the positionals (mount.fuse puts them
    last), as ``-o OPTS`` or ``-oOPTS``.
    """
    global PROG
    PROG = "fuse-unionfs"
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
            print(FUSE_USAGE)
            return EXIT_OK
        elif a.startswith("-") and a != "-":
            print(f"fuse-unionfs: unknown argument {a!r}\n{FUSE_USAGE}", file=sys.stderr)
            return EXIT_USAGE
        else:
            positional.append(a)
    if len(positional) not in (1, 2):
        print(f"fuse-unionfs: expected [SOURCE] MOUNTPOINT\n{FUSE_USAGE}", file=sys.stderr)
        return EXIT_USAGE

    def run(_):
        from unionfs.mount import mount, parse_options
        spec = parse_options(opts, strict=False, warn=_warn)
        mount(spec, positional[-1], foreground=foreground, debug=debug)
        return EXIT_OK
    return _run(run, None)


if __name__ == "__main__":
    sys.exit(main())
