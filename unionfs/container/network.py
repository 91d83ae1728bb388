"""PLACEHOLDER, replaced by the `net` branch's network.py at merge: `private` behaves like `none` here.

The container's network, behind the interface the `net` branch implements:
`private` (own network namespace; the real module gives it outbound access
and `-p` forwarding through pasta or slirp4netns), `host` (the host's
namespace) and `none` (own namespace, loopback only). This stand-in parses
`-p` but forwards nothing and starts no helper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unionfs.errors import UserError

MODES = ("private", "host", "none")


@dataclass(frozen=True)
class PortMapping:
    host_ip: str        # "127.0.0.1" if given as IP:HOST:CTR, else "" (all addresses)
    host_port: int
    container_port: int
    proto: str          # "tcp" | "udp"


_PUBLISH_RE = re.compile(r"^(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(\d+):(\d+)(?:/(tcp|udp))?$")


def parse_publish(spec: str) -> PortMapping:
    m = _PUBLISH_RE.match(spec)
    ports = [int(m.group(2)), int(m.group(3))] if m else []
    if not m or not all(1 <= p <= 65535 for p in ports):
        raise UserError(f"-p {spec}: expected [IP:]HOSTPORT:CTRPORT[/tcp|udp] with ports 1-65535")
    return PortMapping(m.group(1) or "", ports[0], ports[1], m.group(4) or "tcp")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--network {mode}: must be one of {', '.join(MODES)}")


def needs_netns(mode: str) -> bool:
    return mode != "host"


def attach(mode: str, pid: int, ports: list[PortMapping], state_dir: str) -> None:
    pass


def detach(state_dir: str) -> None:
    pass


def resolv_conf(mode: str) -> str:
    if mode == "host":
        try:
            with open("/etc/resolv.conf") as f:
                return f.read()
        except OSError:
            pass
    return ""


def hosts(mode: str, hostname: str) -> str:
    return (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{hostname}\n")
