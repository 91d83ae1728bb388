"""A container's network: `--network private|host|none` and `-p` forwards.

`private` gives the container its own network namespace (the runtime makes
it) and connects it to the host with an existing user-space network stack:
slirp4netns or pasta (Debian package `passt`). The helper brings
up an interface with an address and a default route in the namespace, offers
a DNS forwarder, carries outbound connections from its own sockets on the
host, and listens on the host for each `-p` forward. Connections from the
container to its gateway address reach the host's loopback (pasta maps the
gateway, slirp4netns its 10.0.2.2), as they do in podman's rootless setups.
`host` shares the host's namespace; `none` has loopback only (the runtime
brings `lo` up in a new namespace).

The helper is a process of its own, started between `runc create` and
`runc start`; its pid and start time are recorded in the container's state
directory, so `detach` stops exactly that process, even after the caller
crashed and its pid went to someone else. The helper never holds the
caller's stdout or stderr: a detached `run` returns while it keeps going.

UNIONFS_NETWORK_HELPER=slirp4netns|pasta picks one helper when both are
installed. slirp4netns comes first: the pasta of Debian 12 (passt
0.0~git20230309), on this project's test kernel (6.18), loses the close of
connections from the container (a client waits forever), sometimes repeats
their data, and loses the replies of forwarded UDP flows; slirp4netns does
none of that. Forwards into the container work with both.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from unionfs.errors import UserError
from unionfs.osutil import proc_start

MODES = ("private", "host", "none")
HELPERS = ("slirp4netns", "pasta")        # in order of preference (see above)
HELPER_ENV = "UNIONFS_NETWORK_HELPER"

STATE_FILE = "network.json"               # {"helper", "pid", "start"} of the running helper
PASTA_PIDFILE = "pasta.pid"               # pasta writes its daemon's pid here
SLIRP_SOCKET = "slirp4netns.sock"         # slirp4netns's API socket, for the -p forwards
LOG_SUFFIX = ".log"                       # the helper's own messages: <helper>.log

PASTA_DNS = "169.254.1.1"                 # pasta relays DNS sent here to the host's resolver
SLIRP_DNS = "10.0.2.3"                    # slirp4netns's built-in DNS forwarder
SLIRP_MTU = 65520                         # as pasta's: fewer, larger packets through the tap
SLIRP_TAP = "tap0"

READY_TIMEOUT = 30                        # seconds for a helper to configure the namespace
STOP_TIMEOUT = 5                          # seconds after SIGTERM before SIGKILL

PUBLISH_FORMAT = "[IP:]HOSTPORT:CONTAINERPORT[/tcp|udp]"
PROTOS = ("tcp", "udp")

HOSTS_LOCAL = """\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""
HOSTNAME_ADDRESS = "127.0.1.1"            # as Debian names a host without a fixed address
HOST_RESOLV_CONF = "/etc/resolv.conf"
HOST_HOSTS = "/etc/hosts"


@dataclass(frozen=True)
class PortMapping:
    """One `-p`: the host's HOST_IP:HOST_PORT forwarded to CONTAINER_PORT.
    An empty host_ip means every address of the host."""
    host_ip: str
    host_port: int
    container_port: int
    proto: str

    def __str__(self):
        ip = f"{self.host_ip}:" if self.host_ip else ""
        return f"{ip}{self.host_port}:{self.container_port}/{self.proto}"


# -- the command line -----------------------------------------------------------

def parse_publish(spec: str) -> PortMapping:
    """A `-p` value, "[IP:]HOSTPORT:CONTAINERPORT[/tcp|udp]" (IPv4 only)."""
    def bad(why):
        return UserError(f"bad -p {spec!r}: {why} (expected {PUBLISH_FORMAT})")

    unsafe_ports, slash, proto = spec.partition("/")
    if not slash:
        proto = "tcp"
    if proto not in PROTOS:
        raise bad("the protocol must be tcp or udp")
    parts = unsafe_ports.split(":")
    if len(parts) == 3:
        host_ip = parts.pop(0)
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise bad(f"{host_ip!r} is not an IPv4 address") from None
    elif len(parts) == 2:
        host_ip = ""
    else:
        raise bad("a host port and a container port are needed")
    host_port, container_port = (_port(p, bad) for p in parts)
    return PortMapping(host_ip, host_port, container_port, proto)


def _port(unsafe_port, bad):
    if not (unsafe_port.isascii() and unsafe_port.isdigit()) or not 0 < int(unsafe_port) < 65536:
        raise bad(f"{unsafe_port!r} is not a port (1-65535)")
    return int(unsafe_port)


def check_mode(mode: str) -> None:
    """Refuse an unknown mode, and `private` where no helper is installed."""
    if mode not in MODES:
        raise UserError(f"unknown network mode {mode!r}: use {', '.join(MODES)}")
    if mode == "private":
        _helper()


def needs_netns(mode: str) -> bool:
    """Whether the container gets a network namespace of its own."""
    return mode != "host"


def _helper() -> str:
    """The helper `private` uses: $UNIONFS_NETWORK_HELPER, else the first
    of HELPERS installed."""
    chosen = os.environ.get(HELPER_ENV)
    if chosen:
        if chosen not in HELPERS:
            raise UserError(f"{HELPER_ENV}={chosen!r}: use one of {', '.join(HELPERS)}")
        if not shutil.which(chosen):
            raise UserError(f"{HELPER_ENV}={chosen}, but {chosen} is not installed")
        return chosen
    for helper in HELPERS:
        if shutil.which(helper):
            return helper
    raise UserError("--network private needs slirp4netns or pasta (Debian package passt): "
                    "install one, or use --network host or none")


# -- files the container sees -------------------------------------------------------

def resolv_conf(mode: str) -> str:
    """The container's /etc/resolv.conf: the helper's DNS forwarder (with the
    host's search domains) for `private`, the host's own for `host`, none
    for `none`."""
    check_mode(mode)
    if mode == "none":
        return ""
    host = _read_text(HOST_RESOLV_CONF)
    if mode == "host":
        return host
    nameserver = PASTA_DNS if _helper() == "pasta" else SLIRP_DNS
    kept = [line for line in host.splitlines() if line.split()[:1] in (["search"], ["options"])]
    return "".join(f"{line}\n" for line in [f"nameserver {nameserver}", *kept])


def hosts(mode: str, hostname: str) -> str:
    """The container's /etc/hosts: localhost and the container's hostname;
    with `host`, the host's own entries as well."""
    check_mode(mode)
    if not hostname or re.search(r"[\s#]", hostname) or not hostname.isprintable():
        raise UserError(f"bad hostname {hostname!r}")
    base = _read_text(HOST_HOSTS) if mode == "host" else HOSTS_LOCAL
    if base and not base.endswith("\n"):
        base += "\n"
    named = {name for line in base.splitlines() for name in line.partition("#")[0].split()[1:]}
    return base if hostname in named else f"{base}{HOSTNAME_ADDRESS}\t{hostname}\n"


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


# -- starting and stopping the helper ---------------------------------------------------

# Helpers started by this process that are its children (slirp4netns): kept
# so that `detach` reaps them, and no zombie outlives them.
_children: dict[int, subprocess.Popen] = {}


def attach(mode: str, pid: int, ports: list[PortMapping], state_dir: str) -> None:
    """Connect the network namespace of process `pid` (the container's
    init, after `runc create`, before `runc start`) as `mode` says, with
    `ports` forwarded from the host. Returns when the network is ready; on
    failure raises UserError and leaves no helper running."""
    check_mode(mode)
    if mode != "private":
        if ports:
            raise UserError(f"-p needs --network private, not {mode}")
        return
    helper = _helper()
    _check_ports(ports)
    detach(state_dir)       # a helper left behind by an earlier start of this container
    netns_fd = _open_netns(pid)
    try:
        if helper == "pasta":
            _start_pasta(netns_fd, ports, state_dir)
        else:
            _start_slirp4netns(netns_fd, ports, state_dir)
    except BaseException:
        detach(state_dir)
        raise
    finally:
        os.close(netns_fd)


def detach(state_dir: str) -> None:
    """Stop the helper recorded in `state_dir`, if it still runs. Idempotent;
    a helper that died, or a pid that now belongs to another process, is
    left alone."""
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
        pid, start = int(record["pid"]), str(record["start"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        pid = start = None      # unreadable: nothing we can safely signal
    if pid is not None:
        _stop(pid, start)
    for name in (STATE_FILE, PASTA_PIDFILE, SLIRP_SOCKET):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass


def _check_ports(ports):
    """Refuse two forwards of one host port, and a port already in use on
    the host (the helper would say so less clearly, or not at all)."""
    for i, p in enumerate(ports):
        for q in ports[:i]:
            if (p.host_port, p.proto) == (q.host_port, q.proto) and \
                    (p.host_ip == q.host_ip or not p.host_ip or not q.host_ip):
                raise UserError(f"-p {q} and -p {p} publish the same host port")
        kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            if p.proto == "tcp":    # as the helpers do: a port in TIME_WAIT only is free
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((p.host_ip or "0.0.0.0", p.host_port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserError(f"-p {p}: host port {p.host_ip or '*'}:{p.host_port}/{p.proto} "
                                    f"is already in use") from None
                raise UserError(f"-p {p}: cannot listen there: {e.strerror}") from None


def _open_netns(pid):
    """An fd of process `pid`'s network namespace, refused if it is the
    host's own (the helper would configure the host's network)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"container process {pid} is gone before its network was set up") from None
    ns, own = os.fstat(fd), os.stat("/proc/self/ns/net")
    if (ns.st_dev, ns.st_ino) == (own.st_dev, own.st_ino):
        os.close(fd)
        raise UserError(f"process {pid} shares the host's network namespace: "
                        f"--network private needs one of its own")
    return fd


# The helper joins the namespace through our fd (/proc/self/fd/N in the
# helper), not /proc/PID/ns/net: pasta drops its capabilities before it
# opens the path, and a root-owned container's /proc/PID/ns needs them.

def _start_pasta(netns_fd, ports, state_dir):
    """pasta configures the namespace and binds the forwards, then forks
    its daemon and exits: 0 once the network is ready."""
    pidfile = os.path.join(state_dir, PASTA_PIDFILE)
    argv = ["pasta", "--quiet", "--config-net", "--netns", f"/proc/self/fd/{netns_fd}",
            "--no-netns-quit", "--pid", pidfile, "--dns-forward", PASTA_DNS,
            "-T", "none", "-U", "none"]     # no host ports appear on the container's loopback
    if os.geteuid() == 0:
        argv += ["--runas", "0"]    # as nobody it could not join a root-owned namespace
    for proto, flag in (("tcp", "-t"), ("udp", "-u")):
        specs = [f"{p.host_ip}/{p.host_port}:{p.container_port}" if p.host_ip
                 else f"{p.host_port}:{p.container_port}" for p in ports if p.proto == proto]
        for spec in specs or ["none"]:      # pasta's default forwards every port ("auto")
            argv += [flag, spec]
    log = os.path.join(state_dir, "pasta" + LOG_SUFFIX)
    with open(log, "w") as out:
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                pass_fds=(netns_fd,), start_new_session=True,
                                timeout=READY_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            rc = None
    try:
        with open(pidfile) as f:
            _record(state_dir, "pasta", int(f.read().strip()))
    except (FileNotFoundError, ValueError):
        pass
    if rc != 0:
        raise UserError("pasta: " + (_last_message(log) if rc is not None
                                     else f"not ready after {READY_TIMEOUT} seconds"))
    if not os.path.exists(os.path.join(state_dir, STATE_FILE)):
        raise UserError(f"pasta: started, but its daemon's pid is not in {pidfile}")


def _start_slirp4netns(netns_fd, ports, state_dir):
    """slirp4netns runs in the foreground, detached from our session, and
    writes "1" to its ready fd once the namespace is configured; then each
    forward is added through its API socket."""
    ready_r, ready_w = os.pipe()
    argv = ["slirp4netns", "--configure", f"--mtu={SLIRP_MTU}", "--enable-sandbox",
            "--enable-seccomp", "--netns-type=path", f"--ready-fd={ready_w}",
            f"--api-socket={SLIRP_SOCKET}", f"/proc/self/fd/{netns_fd}", SLIRP_TAP]
    log = os.path.join(state_dir, "slirp4netns" + LOG_SUFFIX)
    try:
        with open(log, "w") as out:
            # cwd: the API socket's path is relative, as a state dir's own path
            # may be longer than a unix socket address allows.
            proc = subprocess.Popen(argv, cwd=state_dir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, pass_fds=(netns_fd, ready_w),
                                    start_new_session=True)
        _children[proc.pid] = proc
        _record(state_dir, "slirp4netns", proc.pid)
        os.close(ready_w)
        ready_w = None
        if not _wait_ready(ready_r, READY_TIMEOUT):
            try:
                proc.wait(timeout=1)    # it closed the pipe as it died: let it finish
                why = _last_message(log)
            except subprocess.TimeoutExpired:
                why = f"not ready after {READY_TIMEOUT} seconds"
            raise UserError(f"slirp4netns: {why}")
    finally:
        os.close(ready_r)
        if ready_w is not None:
            os.close(ready_w)
    for p in ports:
        _slirp_api(state_dir, {"execute": "add_hostfwd", "arguments": {
            "proto": p.proto, "host_addr": p.host_ip or "0.0.0.0",
            "host_port": p.host_port, "guest_port": p.container_port}}, f"-p {p}")


def _wait_ready(fd, timeout):
    """Whether the helper wrote "1" to the ready pipe `fd` in time."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            return os.read(fd, 1) == b"1"       # EOF: the helper died first
    return False


def _slirp_api(state_dir, request, what):
    """One request on slirp4netns's API socket (reached through a dir fd,
    the state dir's path may be too long); UserError if it fails."""
    dir_fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(READY_TIMEOUT)
            s.connect(f"/proc/self/fd/{dir_fd}/{SLIRP_SOCKET}")
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except OSError as e:
        raise UserError(f"slirp4netns: {what}: API socket: {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    try:
        answer = json.loads(reply)
    except ValueError:
        raise UserError(f"slirp4netns: {what}: unreadable reply {reply[:200]!r}") from None
    error = answer.get("error") if isinstance(answer, dict) else answer
    if isinstance(error, dict):
        error = error.get("desc", error)
    if error:
        raise UserError(f"slirp4netns: {what}: {error}")


def _record(state_dir, helper, pid):
    """Write the helper's pid and start time to STATE_FILE, atomically."""
    path = os.path.join(state_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"helper": helper, "pid": pid, "start": proc_start(pid)}, f)
    os.replace(tmp, path)


def _last_message(log):
    """The helper's last line in `log`, without pasta's complaints that it
    has no syslog to write to."""
    lines = [line.strip() for line in _read_text(log).splitlines()
             if line.strip() and not line.startswith("Failed to send")]
    return lines[-1] if lines else "exited without saying why"


def _stop(pid, start):
    """SIGTERM process `pid` if it is still the one started at `start`, then
    SIGKILL after STOP_TIMEOUT; reap it if it is our child."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        _reap(pid)
        return
    try:
        # Checked after pidfd_open: the fd names the process that had the pid
        # then, so it cannot be recycled between the check and the signal.
        if start is None or proc_start(pid) != start:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                break
            if select.select([pidfd], [], [], STOP_TIMEOUT)[0]:    # readable once it exited
                break
    finally:
        os.close(pidfd)
    _reap(pid)


def _reap(pid):
    proc = _children.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
