"""USER[:GROUP] -> uid, gid and supplementary groups, resolved against the
container's own /etc/passwd and /etc/group (read inside the rootfs, never
through a symlink out of it), as docker and runc do."""

from __future__ import annotations

from dataclasses import dataclass

from unionfs.container import rootfs
from unionfs.errors import UserError

PASSWD = "/etc/passwd"
GROUP = "/etc/group"


@dataclass(frozen=True)
class ExecUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str) -> list[_Passwd]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 6 and f[2].isdigit() and f[3].isdigit() and not line.startswith("#"):
            out.append(_Passwd(f[0], int(f[2]), int(f[3]), f[5]))
    return out


def parse_group(text: str) -> list[_Group]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 3 and f[2].isdigit() and not line.startswith("#"):
            members = tuple(m for m in (f[3].split(",") if len(f) > 3 else []) if m)
            out.append(_Group(f[0], int(f[2]), members))
    return out


def _id(unsafe: str) -> int | None:
    return int(unsafe) if unsafe.isdigit() and int(unsafe) < 2**32 - 1 else None


def resolve(spec: str, passwd: list[_Passwd], groups: list[_Group]) -> ExecUser:
    """Resolve `spec` (USER[:GROUP], names or numbers; "" is root) as runc's
    GetExecUser does: a name must exist; a number need not (gid 0 then)."""
    unsafe_user, sep, unsafe_group = (spec or "0").partition(":")
    if not unsafe_user or (sep and not unsafe_group):
        raise UserError(f"-u {spec}: expected USER[:GROUP]")
    uid = _id(unsafe_user)
    entry = next((p for p in passwd if (p.uid == uid if uid is not None else p.name == unsafe_user)), None)
    if entry is None and uid is None:
        raise UserError(f"unable to find user {unsafe_user}: no matching entries in passwd file")
    uid = entry.uid if entry else uid
    gid = entry.gid if entry else 0
    home = entry.home if entry else "/"
    if sep:
        gid = _id(unsafe_group)
        if gid is None:
            g = next((g for g in groups if g.name == unsafe_group), None)
            if g is None:
                raise UserError(f"unable to find group {unsafe_group}: no matching entries in group file")
            gid = g.gid
    # As podman: the primary group first (unless no user was asked for at
    # all); then, unless a group was given, every group that lists the user.
    extra = [gid] if spec else []
    if entry is not None and not sep:
        extra += [g.gid for g in groups if entry.name in g.members]
    return ExecUser(uid, gid, tuple(dict.fromkeys(extra)), home)


def resolve_in(root: str, spec: str) -> ExecUser:
    """`resolve` against the passwd and group files inside `root`."""
    def text(path):
        data = rootfs.read_file(root, path)
        return data.decode("utf-8", "replace") if data else ""
    return resolve(spec, parse_passwd(text(PASSWD)), parse_group(text(GROUP)))
