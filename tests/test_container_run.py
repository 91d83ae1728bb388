"""`unionfs run` and the container lifecycle on the real runtime (runc), real
unionfs mounts and a busybox image with users (container_helpers.py).

Every test's containers are removed at the end of the module, and the module
fails if `rm -f` left a mount or a runtime container behind."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from container_helpers import (
    IMAGE_VOLUME, UNIONFS, Engine, mounts_under, runtime_missing_reason, write_test_image)
from image_helpers import D, L, layer_tar

pytestmark = pytest.mark.skipif(runtime_missing_reason() is not None, reason=runtime_missing_reason() or "")

IMAGE = "busy:1"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_test_image(tmp_path_factory.mktemp("image") / "busy.tar", IMAGE)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, archive):
    e = Engine(tmp_path_factory.mktemp("store") / "store")
    e("image", "load", "-q", archive)
    yield e
    assert e.close() == []


def state(engine, name) -> dict:
    with open(os.path.join(engine.store, "containers", name, "state.json")) as f:
        return json.load(f)


def ps_status(engine, name) -> str:
    for line in engine("ps", "-a").stdout.splitlines()[1:]:
        if line.split()[0] == name:
            return line.split("   ")[-1].strip()
    return ""


def wait_for(pred, timeout=60.0):      # a bound, not a timing check (see below)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


# -- the process: command, environment, user --------------------------------------

def test_image_defaults_and_exit_status(engine):
    r = engine("run", "--rm", IMAGE)
    assert r.stdout == "hello from /app\n"
    r = engine("run", "--rm", IMAGE, "sh", "-c", "env; echo cwd=$(pwd); exit 7", check=False)
    assert r.returncode == 7
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line and not line.startswith("cwd="))
    assert env["GREETING"] == "hello" and env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["HOME"] == "/root"
    assert "cwd=/app" in r.stdout


def test_options_env_workdir_user_entrypoint(engine, tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\nFROM_FILE=1\nGREETING=file\n")
    r = engine("run", "--rm", "--env-file", env_file, "-e", "GREETING=bye", "-e", "EXTRA=x y",
               "-w", "/new/dir", "-u", "1000", IMAGE, "sh", "-c", 'echo "$GREETING|$EXTRA|$FROM_FILE|$(pwd)|$(id -u)"')
    assert r.stdout == "bye|x y|1|/new/dir|1000\n"
    r = engine("run", "--rm", "--entrypoint", "/bin/echo", IMAGE, "a", "b")
    assert r.stdout == "a b\n"
    # --entrypoint without COMMAND drops the image's Cmd, as docker does.
    assert engine("run", "--rm", "--entrypoint", "/bin/echo", IMAGE).stdout == "\n"


def test_user_by_name_has_supplementary_groups(engine):
    r = engine("run", "--rm", "-u", "alice", IMAGE, "sh", "-c", "id -u; id -g; id -G; echo $HOME")
    uid, gid, groups, home = r.stdout.split("\n")[:4]
    assert (uid, gid, home) == ("1000", "1000", "/home/alice")
    assert {"50", "63"} <= set(groups.split())          # staff and audio name alice in /etc/group
    # An explicit group replaces the supplementary ones (docker, podman).
    r = engine("run", "--rm", "-u", "bob:staff", IMAGE, "sh", "-c", "id -u; id -g; id -G")
    assert r.stdout.split("\n")[:3] == ["1001", "50", "50"]
    # A numeric user not in /etc/passwd: gid 0, as docker.
    assert engine("run", "--rm", "-u", "4242", IMAGE, "id", "-g").stdout == "0\n"


def test_pid_1_private_proc_and_hostname(engine):
    r = engine("run", "--rm", "--hostname", "box", IMAGE, "sh", "-c",
               "echo $$; ls /proc | grep -c '^[0-9]'; hostname; cat /etc/hostname; grep -c box /etc/hosts")
    pid, nprocs, hostname, etc_hostname, hosts = r.stdout.split()
    assert pid == "1" and int(nprocs) <= 3      # sh, ls, grep: nothing of the host
    assert hostname == etc_hostname == "box" and hosts == "1"


def test_command_not_found_or_not_executable(engine):
    before = engine.containers()
    r = engine("run", "--rm", IMAGE, "no-such-command", check=False)
    assert r.returncode == 127 and r.stderr.count("\n") == 1 and "no-such-command" in r.stderr
    r = engine("run", "--rm", IMAGE, "/app/hello.txt", check=False)
    assert r.returncode == 126 and r.stderr.count("\n") == 1
    assert engine.containers() == before


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_signals_reach_the_foreground_container(engine, sig):
    p = subprocess.Popen([UNIONFS, "run", "--store", engine.store, "--rm", "--name", "sig", IMAGE, "sh", "-c",
                          f'trap "echo got {sig}; exit 42" {sig}; echo ready; while :; do sleep 0.1; done'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(getattr(signal, "SIG" + sig))
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 42 and f"got {sig}" in out


# -- the filesystem: init layer, diff, volumes -------------------------------------

def test_diff_shows_only_what_the_process_changed(engine):
    engine("run", "--name", "differ", "-v", "/scratch", IMAGE, "sh", "-c",
           "echo new > /app/new.txt; rm /app/hello.txt; echo v > /scratch/v; touch /etc/hosts")
    diff = engine("diff", "differ").stdout.splitlines()
    assert sorted(diff) == ["A /app/new.txt", "C /app", "D /app/hello.txt"]
    upper = Path(engine.store, "containers", "differ", "upper")
    assert sorted(os.listdir(upper)) == ["app"]     # no /proc, /dev, /etc/hosts, volume points
    engine("rm", "differ")


def test_volumes_bind_and_image(engine, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "in.txt").write_text("from host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    engine("run", "--name", "vols", "-v", f"{host}:/mnt/host", "-v", f"{ro}:/mnt/ro:ro", IMAGE, "sh", "-c",
           f"cat /mnt/host/in.txt; echo out > /mnt/host/out.txt; cat {IMAGE_VOLUME}/seed.txt; "
           f"echo kept >> {IMAGE_VOLUME}/seed.txt; touch /mnt/ro/x 2>/dev/null || echo ro-refused")
    assert (host / "out.txt").read_text() == "out\n"
    assert os.listdir(ro) == []
    assert engine("logs", "vols").stdout == ""      # foreground output went to the caller
    # The image volume keeps its content across start; nothing of it is in the upper.
    r = engine("start", "-a", "vols")
    assert r.stdout.splitlines() == ["from host", "seeded by the image", "kept", "ro-refused"]
    assert engine("diff", "vols").stdout == ""
    engine("rm", "vols")
    assert (host / "out.txt").exists()              # rm removes anonymous volumes, not binds


def test_read_only_rootfs(engine):
    r = engine("run", "--rm", "--read-only", IMAGE, "sh", "-c",
               f"touch /app/x 2>/dev/null && echo wrote || echo refused; touch {IMAGE_VOLUME}/v && echo vol-ok")
    assert r.stdout == "refused\nvol-ok\n"


@pytest.mark.parametrize("mode", ["none", "host"])
def test_network_none_and_host(engine, mode):
    r = engine("run", "--rm", "--network", mode, IMAGE, "sh", "-c", "ls /sys/class/net | sort | tr '\\n' ' '; echo; hostname")
    ifaces, hostname = r.stdout.split("\n")[:2]
    if mode == "none":
        assert ifaces == "lo "
    else:
        assert ifaces == " ".join(sorted(os.listdir("/sys/class/net"))) + " "
        assert hostname == socket.gethostname()


# -- detached containers ----------------------------------------------------------

def test_detached_logs_exec_stop_ps(engine):
    r = engine("run", "-d", "--name", "web", IMAGE, "sh", "-c",
               'echo started; echo oops >&2; trap "echo stopping; exit 3" TERM; while :; do sleep 0.1; done')
    assert r.stdout == "web\n"
    wait_for(lambda: "oops" in engine("logs", "web").stdout)
    assert ps_status(engine, "web").startswith("Up ")
    assert engine("logs", "web").stdout.splitlines()[:2] == ["started", "oops"]
    r = engine("exec", "web", "sh", "-c", "echo $$ $GREETING $(pwd); exit 4", check=False)
    assert r.returncode == 4 and r.stdout.split()[1:] == ["hello", "/app"]
    r = engine("exec", "-u", "alice", "-w", "/tmp", "-e", "X=1", "web", "sh", "-c", "id -u; pwd; echo $X")
    assert r.stdout.split() == ["1000", "/tmp", "1"]
    assert engine("exec", "web", "no-such", check=False).returncode == 127
    r = engine("exec", "-w", "/no/such/dir", "web", "true", check=False)
    assert r.returncode == 125 and "/no/such/dir" in r.stderr
    assert engine("rm", "web", check=False).returncode != 0         # running: needs -f
    engine("stop", "web")
    assert state(engine, "web")["exit_code"] == 3
    assert ps_status(engine, "web").startswith("Exited (3) ")
    assert "web" not in engine("ps").stdout                         # only running ones without -a
    assert engine("logs", "web").stdout.splitlines()[-1] == "stopping"
    r = engine("exec", "web", "true", check=False)
    assert r.returncode == 125 and "not running" in r.stderr
    assert not mounts_under(os.path.join(engine.store, "containers", "web"))
    # start runs it again, with the same upper.
    engine("start", "web")
    engine("exec", "web", "sh", "-c", "echo again > /app/again")
    engine("stop", "web")
    assert ps_status(engine, "web").startswith("Exited (3) ")
    assert Path(engine.store, "containers", "web", "upper", "app", "again").read_text() == "again\n"
    engine("rm", "web")


def test_detached_rm_removes_itself(engine):
    engine("run", "-d", "--rm", "--name", "gone", IMAGE, "true")
    wait_for(lambda: "gone" not in engine.containers())
    assert not [i for i in engine.runtime_ids() if i.endswith("-gone")]


def test_logs_follow_until_exit(engine):
    engine("run", "-d", "--name", "follow", IMAGE, "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done; exit 9")
    r = engine("logs", "-f", "follow")
    assert r.stdout == "1\n2\n3\n"
    wait_for(lambda: ps_status(engine, "follow").startswith("Exited (9)"))
    engine("rm", "follow")


def test_crashed_monitor_shows_exited_and_restarts(engine):
    engine("run", "-d", "--name", "crash", IMAGE, "sh", "-c", "echo kept > /app/kept; sleep 1000")
    wait_for(lambda: Path(engine.store, "containers", "crash", "upper", "app", "kept").exists())
    st = state(engine, "crash")
    os.kill(int(st["monitor"].split()[0]), signal.SIGKILL)     # the monitor dies first,
    os.kill(st["pid"], signal.SIGKILL)                         # then, unwatched, the container
    wait_for(lambda: ps_status(engine, "crash").startswith("Exited (255)"))
    assert not mounts_under(os.path.join(engine.store, "containers", "crash"))
    assert Path(engine.store, "containers", "crash", "upper", "app", "kept").read_text() == "kept\n"
    engine("start", "crash")
    assert engine("exec", "crash", "cat", "/app/kept").stdout == "kept\n"
    # Its monitor killed alone: the container runs on; rm -f still cleans up everything.
    os.kill(int(state(engine, "crash")["monitor"].split()[0]), signal.SIGKILL)
    assert ps_status(engine, "crash").startswith("Up ")
    engine("rm", "-f", "crash")
    assert "crash" not in engine.containers()
    assert not [i for i in engine.runtime_ids() if i.endswith("-crash")]
    assert not mounts_under(os.path.join(engine.store, "containers"))


def test_killed_unionfs_daemon_stop_and_start_again(engine):
    from reliability_helpers import daemon_pid
    engine("run", "-d", "--name", "nofs", IMAGE, "sh", "-c", "echo kept > /app/kept; exec sleep 1000")
    upper = Path(engine.store, "containers", "nofs", "upper")
    wait_for(lambda: (upper / "app" / "kept").exists())
    os.kill(daemon_pid(Path(engine.store, "containers", "nofs", "rootfs")), signal.SIGKILL)
    engine("stop", "-t", "1", "nofs")
    assert ps_status(engine, "nofs").startswith("Exited (137) ")     # sleep, as pid 1, ignores TERM
    assert not mounts_under(os.path.join(engine.store, "containers", "nofs"))     # the stale mount went too
    assert (upper / "app" / "kept").read_text() == "kept\n"
    engine("start", "nofs")
    assert engine("exec", "nofs", "cat", "/app/kept").stdout == "kept\n"
    engine("rm", "-f", "nofs")


# -- commit, save, load, run elsewhere ------------------------------------------------

def test_commit_running_container_then_save_load_run(engine, tmp_path):
    engine("run", "-d", "--name", "live", IMAGE, "sh", "-c",
           "echo v2 > /app/version; while :; do date > /tmp/tick; sleep 0.1; done")
    wait_for(lambda: Path(engine.store, "containers", "live", "upper", "app", "version").exists())
    engine("commit", "-c", 'CMD ["cat", "/app/version"]', "-c", "ENV STAGE=two", "-c", "WORKDIR /tmp",
           "live", "live:v2")
    assert ps_status(engine, "live").startswith("Up ")
    assert "(Paused)" not in ps_status(engine, "live")        # resumed after the commit
    engine("commit", "--pause=false", "live", "live:v3")
    assert engine("run", "--rm", "live:v2").stdout == "v2\n"
    assert engine("run", "--rm", "live:v2", "sh", "-c", "echo $STAGE $(pwd)").stdout == "two /tmp\n"
    engine("image", "save", "live:v2", "-o", tmp_path / "live.tar")
    engine("rm", "-f", "live")
    other = Engine(tmp_path / "other-store")
    try:
        other("image", "load", "-q", tmp_path / "live.tar")
        assert other("run", "--rm", "live:v2").stdout == "v2\n"
    finally:
        assert other.close() == []


def test_commit_change_is_checked_before_anything(engine):
    engine("run", "--name", "bad-change", IMAGE, "true")
    r = engine("commit", "-c", "FROM scratch", "bad-change", "x:1", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "FROM" in r.stderr
    engine("rm", "bad-change")


# -- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["no-such-image"], "no such image"),
    (["-v", "/no/such/dir:/x", IMAGE], "does not exist"),
    (["-u", "nobody", IMAGE, "true"], "unable to find user nobody"),
    (["-u", "alice:nogroup", IMAGE, "true"], "unable to find group nogroup"),
    (["-p", "80", IMAGE], "80"),                       # network.py's messages: the value at least
    (["-p", "1:99999", IMAGE], "99999"),
    (["--network", "bridge", IMAGE], "bridge"),
    (["-w", "relative", IMAGE], "-w"),
    (["--runtime", "kata", IMAGE], "--runtime kata"),
])
def test_bad_input_one_line_nothing_left(engine, argv, words):
    before = engine.containers()
    r = engine("run", "--name", "bad", *argv, check=False)
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert engine.containers() == before
    assert not mounts_under(os.path.join(engine.store, "containers"))


def test_hostile_passwd_symlink_is_resolved_inside(engine, tmp_path):
    """/etc/passwd -> an absolute path that exists on the host (with user
    `evil`): resolved inside the rootfs, where it does not exist."""
    host_passwd = tmp_path / "passwd"
    host_passwd.write_text("evil:x:4242:4242::/:/bin/sh\n")
    hostile = layer_tar(D("etc"), L("etc/passwd", str(host_passwd)))
    engine("image", "load", "-q", write_test_image(tmp_path / "hostile.tar", "hostile:1", (hostile,)))
    r = engine("run", "--rm", "-u", "evil", "hostile:1", "true", check=False)
    assert r.returncode == 125 and "unable to find user evil" in r.stderr
    assert engine("run", "--rm", "hostile:1", "id", "-u").stdout == "0\n"
    engine("image", "rm", "-q", "hostile:1")


def test_hostile_links_never_reach_the_host(engine, tmp_path):
    """An image whose /etc/hosts, volume and working dir are symlinks to host
    paths: the container writes there, the host paths do not change."""
    host_file = tmp_path / "hosts"
    host_file.write_text("host's own\n")
    host_dir = tmp_path / "dir"
    host_dir.mkdir()
    layer = layer_tar(D("etc"), L("etc/hosts", str(host_file)), L(IMAGE_VOLUME.lstrip("/"), str(host_dir)),
                      L("app", str(host_dir)))
    engine("image", "load", "-q", write_test_image(tmp_path / "links.tar", "links:1", (layer,)))
    r = engine("run", "--name", "links", "links:1", "sh", "-c",
               f"echo evil >> /etc/hosts; echo evil > {IMAGE_VOLUME}/x; echo evil > ./y; pwd")
    assert r.stdout == f"{host_dir}\n"      # the link's target, made inside the container
    assert host_file.read_text() == "host's own\n" and os.listdir(host_dir) == []
    engine("rm", "links")
    engine("image", "rm", "-q", "links:1")


def test_commit_pauses_a_running_container(engine, monkeypatch):
    """While the layer is written the runtime reports the container paused;
    after the commit it runs again (checked in-process, around write_layer)."""
    from image_helpers import run_cli
    from unionfs.container.runtime import Runtime, container_id
    from unionfs.image import commit as commit_module
    engine("run", "-d", "--name", "frozen", IMAGE, "sh", "-c", "while :; do date > /tmp/t; sleep 0.05; done")
    runtime = Runtime("runc", os.path.realpath(engine.store))
    cid = container_id(os.path.realpath(engine.store), "frozen")
    seen = []
    real_write_layer = commit_module.write_layer

    def spying_write_layer(*args, **kw):
        seen.append(runtime.state(cid)["status"])
        return real_write_layer(*args, **kw)
    monkeypatch.setattr(commit_module, "write_layer", spying_write_layer)
    assert run_cli("commit", "--store", engine.store, "-q", "frozen", "frozen:1")[0] == 0
    assert run_cli("commit", "--store", engine.store, "-q", "--pause=false", "frozen", "frozen:2")[0] == 0
    assert seen == ["paused", "running"]
    assert runtime.state(cid)["status"] == "running"
    engine("rm", "-f", "frozen")


# -- terminals ------------------------------------------------------------------------

def _pty_run(argv, script: bytes | None, timeout=30) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execv(UNIONFS, [UNIONFS, *argv])
        finally:
            os._exit(127)
    out = b""
    sent = script is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                out += data
            if not sent and b"# " in out:
                os.write(fd, script)
                sent = True
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_tty_and_interactive(engine):
    code, out = _pty_run(["run", "--store", engine.store, "--rm", "-t", IMAGE, "sh", "-c",
                          "tty; echo TERM=$TERM; exit 5"], None)
    assert code == 5 and b"/dev/pts/0" in out and b"TERM=xterm" in out
    code, out = _pty_run(["run", "--store", engine.store, "--rm", "-it", IMAGE, "sh"],
                         b"echo answer-$((6*7)); exit 6\r")
    assert code == 6 and b"answer-42" in out
    r = engine("run", "--rm", "-i", IMAGE, "tr", "a-z", "A-Z", input="piped in\n")
    assert r.stdout == "PIPED IN\n"


def test_detached_tty_goes_to_the_log(engine):
    engine("run", "-d", "-t", "--name", "dtty", IMAGE, "sh", "-c", "tty")
    wait_for(lambda: ps_status(engine, "dtty").startswith("Exited (0)"))
    assert engine("logs", "dtty").stdout.strip() == "/dev/pts/0"
    engine("rm", "dtty")
