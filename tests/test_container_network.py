"""The container network (unionfs.container.network) on real runc and real
pasta / slirp4netns: a hand-made bundle (static busybox, its own pid, mount,
ipc, uts and network namespaces) is created, attached, started and checked
from inside with `runc exec`. Every address the tests reach is 127.0.0.1 on
the host, or the container's gateway, which the helper maps to it.

Table tests of `-p` parsing and of the container's resolv.conf and hosts
need neither runc nor a helper.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from unionfs.container import network
from unionfs.container.network import PortMapping, parse_publish
from unionfs.errors import UserError
from unionfs.osutil import proc_start, proc_stat

BUSYBOX = "/bin/busybox"    # Debian busybox-static
HELPERS = [h for h in network.HELPERS if shutil.which(h)]
CTR_TCP_PORT = 8080         # where busybox httpd listens inside
CTR_UDP_PORT = 9090

requires_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runc") or not os.path.isfile(BUSYBOX),
    reason="needs root, runc and busybox-static")


# -- a runc container by hand -------------------------------------------------------

def bundle(base: Path, token: str) -> Path:
    """A runc bundle under `base`: static busybox with its applets, /srv
    holding `token`, and a config with its own network namespace."""
    rootfs = base / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "srv", "etc"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "srv" / "index.html").write_text(token)
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID",
            "CAP_SETUID", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sleep", "300"],
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True,
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")}},
        "root": {"path": "rootfs"},
        "hostname": "nettest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]},
    }
    (base / "config.json").write_text(json.dumps(config))
    return base


class Container:
    """One runc container with its own runc root, so nothing global is shared."""

    def __init__(self, base: Path, token: str):
        self.bundle = bundle(base / "bundle", token)
        self.root = base / "runc"
        self.id = f"unionfs-nettest-{uuid.uuid4().hex[:12]}"
        self.pid = None

    def runc(self, *argv, **kw):
        kw.setdefault("capture_output", True)
        return subprocess.run(["runc", "--root", str(self.root), *argv], text=True, timeout=60,
                              **kw)

    def create(self):
        # The container's stdio is runc create's: a file, so that nothing
        # waits for the container to close a pipe.
        with open(self.bundle / "init.log", "w") as log:
            done = self.runc("create", "--bundle", str(self.bundle), self.id,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, capture_output=False)
        assert done.returncode == 0, (self.bundle / "init.log").read_text()
        self.pid = json.loads(self.runc("state", self.id).stdout)["pid"]

    def start(self):
        done = self.runc("start", self.id)
        assert done.returncode == 0, done.stderr

    def sh(self, script) -> str:
        done = self.runc("exec", self.id, "sh", "-c", script, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{script}: {done.stderr}"
        return done.stdout

    def sh_detached(self, script):
        # Files, not pipes: the process keeps them open after runc returns.
        with open(self.bundle / "exec.log", "a+") as log:
            done = self.runc("exec", "-d", self.id, "sh", "-c", script, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, capture_output=False)
        assert done.returncode == 0, (self.bundle / "exec.log").read_text()

    def delete(self):
        self.runc("delete", "-f", self.id)


@pytest.fixture
def token():
    return f"token-{uuid.uuid4().hex}"


@pytest.fixture
def container(tmp_path, token):
    c = Container(tmp_path, token)
    try:
        c.create()
        yield c
    finally:
        c.delete()


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    try:
        yield str(d)
    finally:
        network.detach(str(d))


@pytest.fixture(params=HELPERS or [pytest.param(None, marks=pytest.mark.skip(
    reason="neither pasta (passt) nor slirp4netns is installed"))])
def helper(request, monkeypatch):
    monkeypatch.setenv(network.HELPER_ENV, request.param)
    return request.param


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorded_helper(state_dir) -> tuple[int, str]:
    with open(os.path.join(state_dir, network.STATE_FILE)) as f:
        record = json.load(f)
    return record["pid"], record["start"]


def gone(pid, start, timeout=10) -> bool:
    """Whether process `pid` started at `start` is gone (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while proc_start(pid) == start:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def http_get(port, timeout=15) -> str:
    """The body served on 127.0.0.1:PORT, retried while the server inside
    is still starting (the forward accepts, then closes, until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            if reply:
                return reply.partition(b"\r\n\r\n")[2].decode()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing served on 127.0.0.1:{port}")
        time.sleep(0.1)


# -- private -------------------------------------------------------------------

# What the pasta of Debian 12 (passt 0.0~git20230309) gets wrong on this
# kernel (see unionfs.container.network): marked so that a fixed pasta shows.
PASTA_LOSES_CLOSE = "Debian 12's pasta loses the close of a connection from the container"
PASTA_LOSES_UDP_REPLIES = "Debian 12's pasta loses the replies of forwarded UDP flows"


def broken_in_pasta(request, helper, reason):
    if helper == "pasta":
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


@requires_runc
def test_private_has_an_interface_and_a_default_route(container, state_dir, helper):
    network.attach("private", container.pid, [], state_dir)
    container.start()
    addrs = container.sh("ip -o -4 addr show")
    assert [line for line in addrs.splitlines() if " lo " not in line and " inet " in line], addrs
    assert container.sh("ip route").startswith("default via "), "no default route"


def _serve_http_through_a_forward(container, state_dir, token):
    """A private network with one TCP forward from a free 127.0.0.1 port to
    an httpd in the container, checked to answer; returns the mapping."""
    tcp = PortMapping("127.0.0.1", free_port(), CTR_TCP_PORT, "tcp")
    network.attach("private", container.pid, [tcp], state_dir)
    container.start()
    container.sh_detached(f"exec httpd -f -p {CTR_TCP_PORT} -h /srv")
    assert http_get(tcp.host_port) == token
    return tcp


@requires_runc
def test_private_forwards_a_tcp_port(container, state_dir, helper, token):
    tcp = _serve_http_through_a_forward(container, state_dir, token)


@requires_runc
def test_private_forwards_a_udp_port(request, container, state_dir, helper, token):
    broken_in_pasta(request, helper, PASTA_LOSES_UDP_REPLIES)
    udp = PortMapping("127.0.0.1", free_port(socket.SOCK_DGRAM), CTR_UDP_PORT, "udp")
    network.attach("private", container.pid, [udp], state_dir)
    container.start()
    # busybox has no UDP server, so the host's python listens inside the
    # container's network namespace (and only there) and answers.
    server = subprocess.Popen(
        ["nsenter", f"--net=/proc/{container.pid}/ns/net", sys.executable, "-c",
         "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         f"s.bind(('0.0.0.0', {CTR_UDP_PORT})); print('ready', flush=True); "
         "data, peer = s.recvfrom(100); s.sendto(b'echo ' + data, peer)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            for _ in range(25):     # UDP may be lost: send until an answer comes
                s.sendto(token.encode(), ("127.0.0.1", udp.host_port))
                try:
                    reply = s.recv(100)
                    break
                except socket.timeout:
                    continue
            else:
                raise AssertionError("no UDP answer through the forward")
        assert reply == b"echo " + token.encode()
    finally:
        server.kill()
        server.wait()


class _TokenHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.server.token.encode())


@pytest.fixture
def host_server(token):
    """A TCP server on the host's 127.0.0.1 only that sends `token` to each
    client and closes."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TokenHandler)
    server.token = token
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@requires_runc
def test_private_reaches_the_hosts_loopback_through_the_gateway(request, container, state_dir,
                                                                helper, host_server, token):
    broken_in_pasta(request, helper, PASTA_LOSES_CLOSE)
    network.attach("private", container.pid, [], state_dir)
    container.start()
    # busybox nc, not wget: the static wget crashes looking up names.
    # `timeout`: a lost close fails the test in seconds, not at runc's timeout.
    reply = container.sh("gw=$(ip route | awk '/^default/ {print $3}'); "
                         f"timeout 5 nc $gw {host_server} </dev/null")
    assert reply == token


@requires_runc
def test_private_resolv_conf_names_the_helpers_forwarder(helper):
    expected = network.PASTA_DNS if helper == "pasta" else network.SLIRP_DNS
    assert network.resolv_conf("private").splitlines()[0] == f"nameserver {expected}"


# -- none ----------------------------------------------------------------------

@requires_runc
def test_none_has_loopback_only(container, state_dir):
    network.attach("none", container.pid, [], state_dir)
    container.start()
    links = [line.split(":")[1].strip() for line in container.sh("ip -o link").splitlines()]
    assert links == ["lo"]
    assert container.sh("ip -o -4 addr show").split()[3] == "127.0.0.1/8"
    assert os.listdir(state_dir) == []      # no helper


# -- stopping the helper ---------------------------------------------------------------

@requires_runc
def test_detach_stops_the_helper_and_is_idempotent(container, state_dir, helper, token):
    tcp = _serve_http_through_a_forward(container, state_dir, token)
    pid, start = recorded_helper(state_dir)

    network.detach(state_dir)
    assert gone(pid, start)
    assert not os.path.exists(os.path.join(state_dir, network.STATE_FILE))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tcp.host_port), timeout=5).close()
    network.detach(state_dir)       # again: nothing to do, no error


@requires_runc
def test_detach_after_the_helper_died(container, state_dir, helper):
    network.attach("private", container.pid, [], state_dir)
    pid, start = recorded_helper(state_dir)
    os.kill(pid, signal.SIGKILL)
    while (stat := proc_stat(pid)) and stat[0] != "Z":     # slirp4netns is our child: a zombie
        time.sleep(0.05)
    network.detach(state_dir)
    assert gone(pid, start)
    assert not os.path.exists(os.path.join(state_dir, network.STATE_FILE))


def test_detach_never_signals_a_recycled_pid(tmp_path):
    """A record whose pid now belongs to another process (its start time
    differs) leaves that process alone."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / network.STATE_FILE).write_text(json.dumps(
            {"helper": "pasta", "pid": other.pid, "start": "1"}))
        network.detach(str(tmp_path))
        assert other.poll() is None
        assert not (tmp_path / network.STATE_FILE).exists()
    finally:
        other.kill()
        other.wait()


def test_detach_without_a_record_does_nothing(tmp_path):
    network.detach(str(tmp_path))
    assert os.listdir(tmp_path) == []


# -- failures leave nothing running -------------------------------------------------------

@contextlib.contextmanager
def _busy_port():
    """A TCP port on 127.0.0.1 that something listens on, for the block."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@requires_runc
def test_a_port_in_use_is_one_line_and_starts_nothing(container, state_dir, helper):
    with _busy_port() as port:
        with pytest.raises(UserError) as e:
            network.attach("private", container.pid,
                           [parse_publish(f"127.0.0.1:{port}:{CTR_TCP_PORT}")], state_dir)
    assert str(e.value) == (f"-p 127.0.0.1:{port}:{CTR_TCP_PORT}/tcp: "
                            f"host port 127.0.0.1:{port}/tcp is already in use")
    assert not os.path.exists(os.path.join(state_dir, network.STATE_FILE))


@requires_runc
def test_the_helpers_own_refusal_is_one_line_and_leaves_no_helper(container, state_dir, helper,
                                                                  monkeypatch):
    """Past the check (a port taken between check and start), the helper's
    own error is reported, and a helper that had started is stopped."""
    started = []
    record = network._record

    def spy(state_dir, helper, pid):
        started.append((pid, proc_start(pid)))
        record(state_dir, helper, pid)
    monkeypatch.setattr(network, "_check_ports", lambda ports: None)
    monkeypatch.setattr(network, "_record", spy)
    with _busy_port() as port:
        with pytest.raises(UserError) as e:
            network.attach("private", container.pid,
                           [parse_publish(f"127.0.0.1:{port}:{CTR_TCP_PORT}")], state_dir)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{helper}: "), message
    if helper == "pasta":
        assert str(port) in message
    assert all(gone(pid, start) for pid, start in started)
    assert not os.path.exists(os.path.join(state_dir, network.STATE_FILE))


@requires_runc
def test_private_refuses_the_hosts_own_namespace(state_dir, helper):
    with pytest.raises(UserError, match="shares the host's network namespace"):
        network.attach("private", os.getpid(), [], state_dir)
    assert os.listdir(state_dir) == []


def test_publish_needs_private(tmp_path):
    with pytest.raises(UserError, match="-p needs --network private"):
        network.attach("host", os.getpid(), [parse_publish("127.0.0.1:8080:80")], str(tmp_path))


# -- table tests -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("8080:80", PortMapping("", 8080, 80, "tcp")),
    ("127.0.0.1:8080:80", PortMapping("127.0.0.1", 8080, 80, "tcp")),
    ("127.0.0.1:8080:80/udp", PortMapping("127.0.0.1", 8080, 80, "udp")),
    ("1:65535/tcp", PortMapping("", 1, 65535, "tcp")),
    ("0.0.0.0:53:5353/udp", PortMapping("0.0.0.0", 53, 5353, "udp")),
])
def test_parse_publish(spec, expected):
    assert parse_publish(spec) == expected
    assert str(expected).removesuffix("/tcp") == spec.removesuffix("/tcp")


@pytest.mark.parametrize("spec, why", [
    ("80", "a host port and a container port are needed"),
    ("", "a host port and a container port are needed"),
    ("1.2.3.4:1:2:3", "a host port and a container port are needed"),
    (":80", "'' is not a port"),
    ("8080:", "'' is not a port"),
    ("0:80", "'0' is not a port"),
    ("8080:65536", "'65536' is not a port"),
    ("80-90:80-90", "'80-90' is not a port"),
    ("+80:80", "'+80' is not a port"),
    ("８0:80", "'８0' is not a port"),
    ("8080:80/sctp", "the protocol must be tcp or udp"),
    ("8080:80/", "the protocol must be tcp or udp"),
    ("localhost:8080:80", "'localhost' is not an IPv4 address"),
    (":8080:80", "'' is not an IPv4 address"),
    ("::1:8080:80", "a host port and a container port are needed"),
    ("127.0.0.1:8080:80\n", "is not a port"),
])
def test_parse_publish_refuses(spec, why):
    with pytest.raises(UserError) as e:
        parse_publish(spec)
    message = str(e.value)
    assert why in message and "\n" not in message, message
    assert message.startswith(f"bad -p {spec!r}: ")


def test_modes():
    assert network.MODES == ("private", "host", "none")
    assert [network.needs_netns(m) for m in network.MODES] == [True, False, True]
    for mode in ("host", "none"):
        network.check_mode(mode)
    with pytest.raises(UserError, match="unknown network mode 'bridge'"):
        network.check_mode("bridge")


def test_private_without_a_helper_is_refused(monkeypatch):
    monkeypatch.delenv(network.HELPER_ENV, raising=False)
    monkeypatch.setattr(network.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs slirp4netns or pasta"):
        network.check_mode("private")


def test_an_unknown_helper_is_refused(monkeypatch):
    monkeypatch.setenv(network.HELPER_ENV, "vde")
    with pytest.raises(UserError, match="UNIONFS_NETWORK_HELPER='vde'"):
        network.check_mode("private")


def test_resolv_conf(monkeypatch, tmp_path):
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 127.0.0.53\nsearch example.test\noptions ndots:2\n")
    monkeypatch.setattr(network, "HOST_RESOLV_CONF", str(host))
    assert network.resolv_conf("none") == ""
    assert network.resolv_conf("host") == host.read_text()
    for helper, nameserver in (("pasta", network.PASTA_DNS), ("slirp4netns", network.SLIRP_DNS)):
        if helper in HELPERS:
            monkeypatch.setenv(network.HELPER_ENV, helper)
            assert network.resolv_conf("private") == \
                f"nameserver {nameserver}\nsearch example.test\noptions ndots:2\n"


def test_hosts(monkeypatch, tmp_path):
    host = tmp_path / "hosts"
    host.write_text("127.0.0.1 localhost\n192.0.2.9 db.example.test  # the database\n")
    monkeypatch.setattr(network, "HOST_HOSTS", str(host))
    text = network.hosts("none", "web")
    assert "127.0.0.1\tlocalhost\n" in text and "::1\tlocalhost" in text
    assert text.endswith("127.0.1.1\tweb\n")
    assert "db.example.test" not in text
    assert network.hosts("host", "web") == host.read_text() + "127.0.1.1\tweb\n"
    assert network.hosts("host", "db.example.test") == host.read_text()    # named already
    for bad in ("", "a b", "a\nb", "a#b"):
        with pytest.raises(UserError, match="bad hostname"):
            network.hosts("none", bad)
