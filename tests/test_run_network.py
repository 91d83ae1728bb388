"""`unionfs run --network private|host|none` and `-p`, through the real CLI
(DESIGN §6): a forward answered from inside, loopback only with `none`, the
host's interfaces with `host`, the host's loopback reached from `private`.
Every address reached is 127.0.0.1, or the container's gateway, which the
network helper maps to the host's loopback.

Needs the `run` command (branch `run`); skipped where the CLI has none.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import uuid

import pytest

from conftest import UNIONFS
from image_helpers import D, F, L, docker_archive, layer_tar

BUSYBOX = "/bin/busybox"    # Debian busybox-static
IMAGE = "nettest:latest"


def _has_run_command() -> bool:
    done = subprocess.run([UNIONFS, "run", "--help"], capture_output=True, timeout=60)
    return done.returncode == 0


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runc") or not os.path.isfile(BUSYBOX),
                       reason="needs root, runc and busybox-static"),
    pytest.mark.skipif(not _has_run_command(), reason="needs `unionfs run` (branch run)"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding IMAGE: static busybox with its applets."""
    base = tmp_path_factory.mktemp("runnet")
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    tar = layer_tar(*[D(d) for d in ("bin", "dev", "etc", "proc", "sys", "tmp")],
                    F("bin/busybox", busybox, mode=0o755),
                    *[L(f"bin/{a}", "busybox") for a in applets.split() if a != "busybox"])
    archive = base / "image.tar"
    docker_archive(archive, [tar], tags=(IMAGE,))
    store = base / "store"
    done = subprocess.run([UNIONFS, "image", "load", "--store", str(store), str(archive)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return store


def run(store, *argv, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([UNIONFS, "run", "--store", str(store), "--rm", *argv],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_published_port_is_answered_from_inside(store):
    token = f"token-{uuid.uuid4().hex}"
    port = free_port()
    # nc serves one connection and exits, and so does the container.
    proc = subprocess.Popen([UNIONFS, "run", "--store", str(store), "--rm",
                             "-p", f"127.0.0.1:{port}:8080", IMAGE,
                             "nc", "-l", "-p", "8080", "-e", "echo", token],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        reply = b""
        while not reply and time.monotonic() < deadline:
            try:        # the forward may accept and close until nc listens
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    while chunk := s.recv(1024):
                        reply += chunk
            except OSError:
                pass
            if not reply:
                time.sleep(0.2)
        assert reply.decode() == token + "\n"
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_network_none_has_loopback_only(store):
    done = run(store, "--network", "none", IMAGE, "ip", "-o", "link")
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[1].strip() for line in done.stdout.splitlines()] == ["lo"]


def test_network_host_sees_the_hosts_interfaces(store):
    done = run(store, "--network", "host", IMAGE, "ip", "-o", "link")
    assert done.returncode == 0, done.stderr
    names = {line.split(":")[1].strip().partition("@")[0] for line in done.stdout.splitlines()}
    assert names == set(os.listdir("/sys/class/net"))


class _TokenHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.server.token.encode())


def test_private_reaches_a_server_on_the_hosts_loopback(store):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TokenHandler)
    server.token = f"token-{uuid.uuid4().hex}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run(store, IMAGE, "sh", "-c", "gw=$(ip route | awk '/^default/ {print $3}'); "
                   f"timeout 5 nc $gw {server.server_address[1]} </dev/null")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == server.token


@pytest.mark.parametrize("spec", ["127.0.0.1:99999:80", "80", "8080:80/sctp"])
def test_a_bad_publish_is_one_line(store, spec):
    done = run(store, "-p", spec, IMAGE, "true")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "bad -p" in done.stderr, done.stderr


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_rm_f_stops_the_network_helper(store, tmp_path):
    """`rm -f` of a running container stops its network helper: the published
    host port is free again (pasta runs with --no-netns-quit, so nothing else
    would stop it)."""
    from unionfs.container import network
    name = f"netrm-{uuid.uuid4().hex[:8]}"
    port = free_port()
    done = subprocess.run([UNIONFS, "run", "--store", str(store), "-d", "--name", name,
                           "-p", f"127.0.0.1:{port}:8080", IMAGE, "sleep", "600"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    # A copy of the helper's record, to stop it here if rm -f does not.
    state = os.path.join(store, "containers", name, "net", network.STATE_FILE)
    saved = tmp_path / "net"
    saved.mkdir()
    try:
        assert done.returncode == 0, done.stderr
        shutil.copy(state, saved / network.STATE_FILE)
        assert not _port_is_free(port)              # the helper forwards it
        rm = subprocess.run([UNIONFS, "rm", "--store", str(store), "-f", name],
                            capture_output=True, text=True, timeout=120)
        assert rm.returncode == 0, rm.stderr
        deadline = time.monotonic() + 10
        while not _port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _port_is_free(port), "the network helper still holds the published port"
    finally:
        network.detach(str(saved))
        subprocess.run([UNIONFS, "rm", "--store", str(store), "-f", name], capture_output=True, timeout=120)
