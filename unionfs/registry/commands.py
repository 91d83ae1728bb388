"""The registry subcommands: `login`, `logout`, `push`, `pull`.
`register(subparsers)` adds them to the top-level argparse subparsers; each
sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from unionfs.errors import EXIT_OK, UserError
from unionfs.image.progress import Progress
from unionfs.image.store import Image, Store, default_store_path
from unionfs.registry import auth, reference
from unionfs.registry.manifest import FORMATS


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def register(subparsers):
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR",
                       help="image store (default: $UNIONFS_STORE, else /var/lib/unionfs as root, "
                            "~/.local/share/unionfs otherwise)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="no progress or informational output")
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--tls-verify", type=_bool, default=True, metavar="BOOL",
                      help="require https with a trusted certificate (default true); false also allows "
                           "plain http")
    conn.add_argument("--cert-dir", metavar="DIR",
                      help="the registry's CA (*.crt) and client certificate (*.cert, *.key) "
                           "(default: /etc/containers/certs.d/HOST[:PORT])")
    conn.add_argument("--authfile", metavar="FILE",
                      help="auth file (default: $REGISTRY_AUTH_FILE, else "
                           "$XDG_RUNTIME_DIR/containers/auth.json)")

    p = subparsers.add_parser("login", parents=[conn], help="log in to a registry (stores the credentials)")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="the password (visible to other users: prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_login)

    p = subparsers.add_parser("logout", help="forget a registry's stored credentials")
    p.add_argument("--authfile", metavar="FILE", help="auth file (default as for login)")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)

    p = subparsers.add_parser("push", parents=[store, quiet, conn], help="push an image to a registry")
    p.add_argument("--format", choices=FORMATS, default="oci",
                   help="manifest format: oci (default) or docker (schema 2)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="REGISTRY/REPO[:TAG]", nargs="?",
                   help="where to push (default: IMAGE's own name, which must name a registry)")
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("pull", parents=[store, quiet, conn], help="pull an image from a registry")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform index (default: this machine's)")
    p.add_argument("ref", metavar="REGISTRY/REPO[:TAG|@DIGEST]")
    p.set_defaults(func=cmd_pull)


def _store(args) -> Store:
    return Store(args.store or default_store_path())


def _use_authfile(args):
    """--authfile stands for $REGISTRY_AUTH_FILE, as in podman and skopeo."""
    if args.authfile:
        os.environ[auth.ENV_AUTH_FILE] = args.authfile


def cmd_login(args) -> int:
    from unionfs.registry.client import Client
    registry = reference.registry_host(args.registry)
    _use_authfile(args)
    username = args.username
    if username is None:
        if not sys.stdin.isatty() or args.password_stdin:
            raise UserError(f"login {registry}: give the user name with -u USER")
        username = input("Username: ")
    if args.password_stdin:
        if args.password is not None:
            raise UserError("login: --password and --password-stdin exclude each other")
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UserError(f"login {registry}: no password (use --password-stdin)")
    if not username or not password:
        raise UserError(f"login {registry}: empty user name or password")
    creds = auth.Credentials(username, password)
    with Client(registry, reference.api_host(registry), args.tls_verify, args.cert_dir, creds=creds) as client:
        client.check_login()
    auth.store(registry, creds)
    print("Login Succeeded!")
    return EXIT_OK


def cmd_logout(args) -> int:
    registry = reference.registry_host(args.registry)
    _use_authfile(args)
    if not auth.remove(registry):
        raise UserError(f"logout {registry}: not logged in (no entry in {auth.auth_file()})")
    print(f"Removed login credentials for {registry}")
    return EXIT_OK


def push_image(store: Store, image_ref: str, dest: str | None, fmt: str, tls_verify: bool,
               cert_dir: str | None, progress: Progress) -> str:
    """`push`: `image_ref` from `store` to `dest` (default: its own name,
    which must name a registry); returns the manifest digest."""
    from unionfs.registry.client import Client
    from unionfs.registry.push import push
    image = store.resolve(image_ref)
    ref = reference.parse(dest or image_ref, need_registry=True)
    if ref.digest:
        raise UserError(f"push {ref}: push to a tag, not a digest")
    try:
        with Client(ref.registry, ref.api_host, tls_verify, cert_dir) as client:
            return push(store, client, image, ref, fmt, progress)
    finally:
        progress.finish()


def pull_image(store: Store, ref_text: str, platform: str | None, tls_verify: bool,
               cert_dir: str | None, progress: Progress) -> Image:
    """`pull`: `ref_text` into `store` (`platform` OS/ARCH[/VARIANT] of a
    multi-platform index, default this machine's); returns the image."""
    from unionfs.registry.client import Client
    from unionfs.registry.pull import parse_platform, pull
    ref = reference.parse(ref_text)
    want = parse_platform(platform) if platform else None
    try:
        with Client(ref.registry, ref.api_host, tls_verify, cert_dir) as client:
            return pull(store, client, ref, want, progress)
    finally:
        progress.finish()


def cmd_push(args) -> int:
    _use_authfile(args)
    digest = push_image(_store(args), args.image, args.dest, args.format, args.tls_verify, args.cert_dir,
                        Progress(quiet=args.quiet))
    print(digest)
    return EXIT_OK


def cmd_pull(args) -> int:
    _use_authfile(args)
    image = pull_image(_store(args), args.ref, args.platform, args.tls_verify, args.cert_dir,
                       Progress(quiet=args.quiet))
    print(image.id)
    return EXIT_OK
