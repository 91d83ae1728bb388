"""The container subcommands: `run`, `start`, `stop`, `logs`, `exec`.
(`ps`, `rm` and `commit` are image/commands.py's, which ask lifecycle.py
about containers made by `run`.) `register(subparsers)` adds them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
import time

from unionfs.container import lifecycle, network, record, rootfs, spec
from unionfs.container.record import STOP_TIMEOUT, EngineError, RunConfig, engine_error
from unionfs.errors import EXIT_OK, UserError
from unionfs.image.store import Container, Store, default_store_path

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[^=\s]+$")
LOG_POLL = 0.1      # seconds between looks at a followed log


def register(subparsers):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR",
                        help="image store (default: $UNIONFS_STORE, else /var/lib/unionfs as root, "
                             "~/.local/share/unionfs otherwise)")

    p = subparsers.add_parser("run", parents=[common], help="run a command in a new container")
    _run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("start", parents=[common], help="start stopped containers again")
    p.add_argument("-a", "--attach", action="store_true", help="attach stdout/stderr, return its exit status")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.set_defaults(func=cmd_start)

    p = subparsers.add_parser("stop", parents=[common], help="stop running containers")
    p.add_argument("-t", "--time", type=float, default=STOP_TIMEOUT, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL (10)")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("logs", parents=[common], help="show a container's output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("exec", parents=[common], help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VAL]")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(func=cmd_exec)


def _run_arguments(p: argparse.ArgumentParser):
    p.add_argument("--name", help="the container's name (default: from the image's)")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the name")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VAL]")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="[HOST:]CTR[:ro]")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("--hostname", metavar="NAME")
    p.add_argument("--entrypoint", metavar="CMD")
    p.add_argument("--network", default="private", metavar="|".join(network.MODES))
    p.add_argument("-p", "--publish", action="append", default=[], metavar="[IP:]HOSTPORT:CTRPORT[/PROTO]")
    p.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    p.add_argument("--runtime", default="runc", help="OCI runtime: runc (default) or crun")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")


# -- option parsing --------------------------------------------------------------

def _env_item(unsafe: str, where: str) -> str | None:
    """KEY=VAL as is; KEY alone takes the value from our environment (or is
    dropped), as docker does."""
    key, eq, _ = unsafe.partition("=")
    if not _ENV_NAME_RE.match(key):
        raise UserError(f"{where}: invalid environment variable {unsafe!r}")
    if eq:
        return unsafe
    return f"{key}={os.environ[key]}" if key in os.environ else None


def parse_env(env: list[str], env_files: list[str]) -> list[str]:
    out = []
    for path in env_files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UserError(f"--env-file {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            line = line.lstrip()
            if line and not line.startswith("#"):
                out.append(_env_item(line, f"--env-file {path}:{n}"))
    out += [_env_item(e, f"-e {e}") for e in env]
    return [e for e in out if e is not None]


def _container_path(unsafe: str, what: str) -> str:
    if not unsafe.startswith("/"):
        raise UserError(f"{what}: {unsafe!r} is not an absolute path")
    path = rootfs.clean(unsafe)
    if path == "/":
        raise UserError(f"{what}: cannot be /")
    return path


def parse_volumes(specs: list[str], image_volumes: list[str]) -> tuple[list[dict], list[str]]:
    """-v HOST:CTR[:ro|rw] binds and -v CTR anonymous volumes, plus the
    image's Volumes that no -v covers -> (binds, anonymous paths)."""
    binds, anonymous = [], []
    for s in specs:
        parts = s.split(":")
        if len(parts) == 2 and parts[1] in ("ro", "rw"):
            parts = [parts[0]]          # CTR:MODE of an anonymous volume
        if len(parts) == 1:
            anonymous.append(_container_path(parts[0], f"-v {s}"))
            continue
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise UserError(f"-v {s}: expected HOST:CTR[:ro|rw]")
        host, ctr = parts[0], _container_path(parts[1], f"-v {s}")
        if not host.startswith("/"):
            raise UserError(f"-v {s}: named volumes are not supported; give an absolute host path")
        if not os.path.exists(host):
            raise UserError(f"-v {s}: bind source path {host} does not exist")
        binds.append({"source": os.path.realpath(host), "destination": ctr,
                      "readonly": len(parts) == 3 and parts[2] == "ro"})
    taken = {b["destination"] for b in binds}
    for v in image_volumes:
        path = rootfs.clean(v)
        if path != "/" and path not in taken and path not in anonymous:
            anonymous.append(path)
    return binds, [a for a in dict.fromkeys(anonymous) if a not in taken]


def _check_user(unsafe: str | None):
    if unsafe is None:
        return
    user, sep, group = unsafe.partition(":")
    if not user or (sep and not group) or ":" in group or any(ch.isspace() for ch in unsafe):
        raise UserError(f"-u {unsafe}: expected USER[:GROUP]")


# -- commands --------------------------------------------------------------------

def _store(args) -> Store:
    return Store(args.store or default_store_path())


def _container(store: Store, name: str):
    c = store.container(name)
    if c is None:
        raise EngineError(f"container {name}: no such container")
    if not record.is_run_container(c):
        raise EngineError(f"container {name} was made by `image mount`, not `run`; it has no process")
    return c


def run_config(args, image_config: dict, name: str) -> RunConfig:
    """`run`'s options over the image's config -> what the container runs
    (checked here, before anything is created)."""
    if args.tty and args.interactive and not args.detach and not sys.stdin.isatty():
        raise UserError("-it: the input device is not a TTY")
    network.check_mode(args.network)
    ports = [network.parse_publish(p) for p in args.publish]
    env = parse_env(args.env, args.env_file)
    binds, volumes = parse_volumes(args.volume, list(image_config.get("Volumes") or {}))
    _check_user(args.user)
    cwd = _container_path(args.workdir, "-w") if args.workdir else \
        rootfs.clean(image_config.get("WorkingDir") or "/")
    if args.hostname:
        hostname = args.hostname
    elif args.network == "host":
        hostname = socket.gethostname()     # as docker: the host's network, the host's name
    else:
        hostname = re.sub(r"[^A-Za-z0-9-]", "-", name)[:63].strip("-") or "container"
    if not _HOSTNAME_RE.match(hostname):
        raise UserError(f"--hostname {hostname}: not a valid host name")
    process_args = spec.process_args(image_config, args.command, args.entrypoint)
    if not process_args:
        raise UserError(f"image {args.image} has no Cmd or Entrypoint: give a COMMAND")
    return RunConfig(
        args=process_args, env=spec.merge_env(list(image_config.get("Env") or []), env), cwd=cwd,
        user=args.user if args.user is not None else (image_config.get("User") or ""),
        hostname=hostname, network=args.network, ports=[dataclasses.asdict(p) for p in ports],
        read_only=args.read_only, runtime=args.runtime, tty=args.tty, interactive=args.interactive,
        auto_remove=args.rm, binds=binds, volumes=volumes)


def create_container(store: Store, args) -> Container:
    """`run`'s first half: `args` (run's options) checked against the image,
    and the container made (not started)."""
    from unionfs.image.commands import _container_name
    try:
        image = store.resolve(args.image)
        name = args.name or _container_name(store, image)
        rc = run_config(args, store.config(image).get("config") or {}, name)
        record.runtime_for(store, rc)         # the runtime is installed and usable
        return lifecycle.create(store, image, name, rc, ref=args.image)
    except UserError as e:
        raise engine_error(e) from None


def start_created(store: Store, c: Container, attach: bool) -> int:
    """`run`'s second half: start `c`, as `lifecycle.start`; if it does not
    start, it is removed again."""
    try:
        return lifecycle.start(store, c, attach=attach)
    except UserError as e:
        # Nothing ran: leave nothing behind.
        if store.container(c.name) is not None:
            lifecycle.remove(store, c, force=True)
        raise engine_error(e) from None


def run_args(image: str, command: list[str] | None = None, **options) -> argparse.Namespace:
    """`run`'s arguments made in Python: the command line's defaults, with
    `options` by their long names (``rm=True``, ``env=["K=V"]``); an
    unknown option is a TypeError."""
    p = argparse.ArgumentParser(add_help=False)
    _run_arguments(p)
    args = p.parse_args(["IMAGE"])
    args.image, args.command = image, list(command or [])
    for key, value in options.items():
        if key in ("image", "command", "store") or not hasattr(args, key):
            raise TypeError(f"run() got an unexpected keyword argument {key!r}")
        setattr(args, key, value)
    return args


def cmd_run(args) -> int:
    store = _store(args)
    c = create_container(store, args)
    code = start_created(store, c, attach=not args.detach)
    if args.detach:
        print(c.name, flush=True)
    return code


def cmd_start(args) -> int:
    store = _store(args)
    if args.attach and len(args.names) > 1:
        raise EngineError("start -a: one container at a time")
    code = EXIT_OK
    for name in args.names:
        try:
            c = _container(store, name)
            code = lifecycle.start(store, c, attach=args.attach)
        except UserError as e:
            raise engine_error(e) from None
        if not args.attach:
            print(name, flush=True)
    return code


def cmd_stop(args) -> int:
    store = _store(args)
    for name in args.names:
        try:
            lifecycle.stop(store, _container(store, name), max(args.time, 0))
        except UserError as e:
            raise engine_error(e) from None
        print(name, flush=True)
    return EXIT_OK


def cmd_logs(args) -> int:
    store = _store(args)
    c = _container(store, args.name)
    path = record.log_path(c)
    out = sys.stdout.buffer
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return EXIT_OK          # never ran detached: no output recorded
    with f:
        while True:
            data = f.read(65536)
            if data:
                out.write(data)
                continue
            out.flush()
            if not args.follow or lifecycle.refresh(store, c).status != "running":
                # One more read: what was written just before it exited.
                rest = f.read()
                out.write(rest)
                out.flush()
                return EXIT_OK
            time.sleep(LOG_POLL)


def cmd_exec(args) -> int:
    store = _store(args)
    try:
        if not args.command:
            raise UserError("exec: give a COMMAND")
        c = _container(store, args.name)
        _check_user(args.user)
        env = parse_env(args.env, [])
        cwd = _container_path(args.workdir, "-w") if args.workdir else None
        return lifecycle.exec_(store, c, args.command, env, cwd, args.user, args.interactive, args.tty)
    except UserError as e:
        raise engine_error(e) from None
