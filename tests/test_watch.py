"""Watching copy-on-write (DESIGN.md §8): the observer the core reports to,
without a mount; then `unionfs which`, `events` and `stats` through the real
CLI on real mounts, the control socket's owner check, and a follower that
stops reading while the filesystem goes on."""

import json
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from conftest import UNIONFS, Layers, requires_fuse, requires_root, run
from image_helpers import D, F, docker_archive, force_unmount, layer_tar
from unionfs import observe
from unionfs.union import Union


# -- the observer, without FUSE ------------------------------------------------------

def test_histogram_buckets_hold_their_values():
    for ns in (0, 1, 3, 4, 7, 8, 1000, 12_345, 10**9, 2**40 + 5):
        low, high = observe.bucket_bounds(observe.bucket_of(ns))
        assert low <= ns < high
        assert high - low <= max(1, ns // 4 + 1)       # about 25% wide at most
    hist = [0] * observe.BUCKETS
    for ns in [1000] * 98 + [10**6] * 2:
        hist[observe.bucket_of(ns)] += 1
    assert 1000 <= observe.quantile(hist, 0.5) < 1300
    assert 10**6 <= observe.quantile(hist, 0.99) < 1.3 * 10**6
    assert observe.quantile([0] * observe.BUCKETS, 0.5) is None


def test_the_core_reports_copy_ups_whiteouts_and_opaque_dirs(tmp_path):
    lay = Layers(tmp_path, nlower=1)
    (lay.lowers[0] / "f").write_bytes(b"x" * 5000)
    (lay.lowers[0] / "gone").write_text("g")
    (lay.lowers[0] / "d").mkdir()
    (lay.lowers[0] / "d/in").write_text("in")
    u = Union([str(lay.lowers[0])], str(lay.upper), str(lay.work))
    rec = observe.Recorder()
    u.copyup.observer = rec
    os.close(u.open("/f", os.O_WRONLY))
    u.unlink("/gone")
    u.unlink("/d/in")
    u.rmdir("/d")
    u.mkdir("/d", 0o755)
    kinds = [(kind, path, nbytes) for _, kind, path, _, nbytes, _ in rec.recent()]
    assert kinds == [("copy-up", "/f", 5000), ("whiteout", "/gone", 0), ("copy-up", "/d", 0),
                     ("whiteout", "/d/in", 0), ("whiteout", "/d", 0), ("opaque", "/d", 0)]
    snap = rec.snapshot()
    assert snap["copy_up"]["count"] == 2 and snap["copy_up"]["bytes"] == 5000
    assert (snap["whiteouts"], snap["opaque_dirs"]) == (3, 1)


def test_a_full_listener_drops_and_counts_and_others_still_get_everything():
    rec = observe.Recorder(ring=8)
    slow, fast = rec.listen(size=3), rec.listen(size=100)
    assert rec.listening
    for i in range(10):
        rec.whiteout(f"/w{i}")
    assert [e[2] for e in slow.queue] == ["/w0", "/w1", "/w2"] and slow.dropped == 7
    assert len(fast.queue) == 10 and fast.dropped == 0
    assert len(rec.recent()) == 8                       # the ring is bounded too
    rec.unlisten(slow)
    rec.unlisten(fast)
    assert not rec.listening and rec.snapshot()["events"]["dropped"] == 7


# -- through the CLI, on real mounts ---------------------------------------------------

def cli(*args, check=True, timeout=60):
    r = run([UNIONFS, *map(str, args)], timeout=timeout)
    if check:
        assert r.returncode == 0, f"unionfs {args}: {r.stderr}"
    return r


def one_line_error(r):
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: "), r.stderr
    return lines[0]


@pytest.fixture
def tree(layers):
    """l0 over l1: a file in each, a directory to replace, one to rename."""
    top, bottom = layers.lowers
    (bottom / "base.txt").write_text("from the bottom\n")
    (top / "top.txt").write_text("from the top\n")
    (bottom / "big").write_bytes(os.urandom(123_457))
    (bottom / "doomed").write_text("d")
    (bottom / "replaced").mkdir()
    (bottom / "replaced/old").write_text("old")
    (bottom / "moved").mkdir()
    (bottom / "moved/a").write_bytes(b"a" * 10)
    (top / "moved").mkdir()
    (top / "moved/b").write_bytes(b"b" * 20)
    return layers


def events_json(mnt):
    lines = cli("events", "--json", mnt).stdout.splitlines()
    return [json.loads(line) for line in lines]


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_which_names_the_layer_of_lower_upper_copied_up_and_new_files(tree, mounted):
    mnt = mounted()
    with open(mnt / "base.txt", "a") as f:
        f.write("changed\n")
    (mnt / "new.txt").write_text("new\n")
    r = cli("which", mnt / "top.txt", mnt / "base.txt", mnt / "new.txt", mnt / "moved")
    lines = r.stdout.splitlines()
    assert lines[0] == f"{mnt}/top.txt: lower 1 {tree.lowers[0]}"
    assert lines[1] == f"{mnt}/base.txt: upper {tree.upper} (copied up from lower 2 {tree.lowers[1]})"
    assert lines[2] == f"{mnt}/new.txt: upper {tree.upper} (new: nothing below it)"
    assert lines[3] == f"{mnt}/moved: lower 1 {tree.lowers[0]}; merged with lower 2"
    r = cli("which", "--json", mnt / "base.txt", mnt / "top.txt")
    info = [json.loads(x) for x in r.stdout.splitlines()]
    assert info[0]["layer"] == "upper" and info[0]["copied_up"] is True
    assert info[0]["from"] == {"layer": "lower", "index": 2, "dir": str(tree.lowers[1])}
    assert (info[1]["layer"], info[1]["index"], info[1]["copied_up"]) == ("lower", 1, False)
    # Outside any unionfs mount, or missing: one line each, non-zero exit.
    assert "not inside a unionfs mount" in one_line_error(cli("which", tree.base, check=False))
    assert "no such file" in one_line_error(cli("which", mnt / "nope", check=False))


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_events_and_stats_show_copy_up_whiteout_opaque_and_dir_copy(tree, mounted):
    mnt = mounted()
    with open(mnt / "big", "r+b") as f:             # copy-up of 123457 bytes
        f.write(b"X")
    os.unlink(mnt / "doomed")                       # whiteout
    shutil.rmtree(mnt / "replaced")                 # whiteouts ...
    os.mkdir(mnt / "replaced")                      # ... and an opaque directory
    os.rename(mnt / "moved", mnt / "moved2")        # a merged directory copied whole

    events = events_json(mnt)
    seen = [(e["kind"], e["path"], e["op"]) for e in events]
    big = [e for e in events if e["path"] == "/big"]
    assert [(e["kind"], e["op"], e["bytes"]) for e in big] == [("copy-up", "open", 123_457)]
    assert big[0]["duration_us"] > 0
    assert ("whiteout", "/doomed", "unlink") in seen
    assert ("whiteout", "/replaced/old", "unlink") in seen
    assert ("whiteout", "/replaced", "rmdir") in seen
    assert ("opaque", "/replaced", "mkdir") in seen
    dir_copy = [e for e in events if e["kind"] == "dir-copy"]
    assert [(e["path"], e["op"], e["bytes"]) for e in dir_copy] == [("/moved", "rename", 30)]
    assert ("whiteout", "/moved", "rename") in seen
    assert all(e["time"] > 0 for e in events)

    text = cli("events", mnt).stdout.splitlines()
    assert len(text) == len(events)
    assert any(" copy-up " in line and "/big op=open bytes=123457 " in line for line in text)
    assert any(" dir-copy " in line and "/moved op=rename bytes=30 " in line for line in text)
    assert any(" opaque " in line and line.endswith("/replaced op=mkdir") for line in text)

    stats = json.loads(cli("stats", "--json", mnt).stdout)
    kinds = [e["kind"] for e in events]
    assert stats["copy_up"]["count"] == kinds.count("copy-up")
    assert stats["copy_up"]["bytes"] == sum(e["bytes"] for e in events if e["kind"] == "copy-up")
    assert stats["copy_up"]["bytes"] >= 123_457 + 30
    assert stats["whiteouts"] == kinds.count("whiteout") == 4
    assert stats["opaque_dirs"] == kinds.count("opaque")
    assert stats["dir_copy"] == {"count": 1, "bytes": 30, "seconds": stats["dir_copy"]["seconds"]}
    for op in ("lookup", "open", "unlink", "rmdir", "mkdir", "rename"):
        r = stats["requests"][op]
        assert r["count"] >= 1 and 0 < r["p50_us"] <= r["p99_us"]
    assert stats["rss_bytes"] > 1 << 20 and stats["threads"] >= 2
    with open(mnt / "top.txt") as f:
        assert json.loads(cli("stats", "--json", mnt).stdout)["open_files"] == 1
        f.read()
    text = cli("stats", mnt).stdout
    assert f"whiteouts       {stats['whiteouts']}\n" in text and "rename " in text


@requires_fuse
@pytest.mark.fuse
@requires_root
@pytest.mark.timeout(120)
def test_the_control_socket_serves_only_the_mounts_owner(tree, mounted):
    from unionfs import control
    from unionfs.mount import pidfile_for
    mnt = mounted()
    sock = control.socket_for(pidfile_for(str(mnt)))
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3 to run a client as nobody")
    client = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
              "s.sendall(b'{\"cmd\": \"stats\"}\\n'); sys.stdout.write(s.makefile().read())")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # With CAP_DAC_OVERRIDE the file mode does not stop it: SO_PEERCRED must.
    r = run(nobody + ["--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                      "/usr/bin/python3", "-c", client, sock], timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"error": "refused: uid 65534 is not the mount's owner"}
    # Without it, the 0600 socket in a 0700 directory is out of reach.
    r = run(nobody + ["/usr/bin/python3", "-c", client, sock], timeout=30)
    assert r.returncode != 0 and "PermissionError" in r.stderr and r.stdout == ""
    # The owner still gets served.
    assert json.loads(cli("stats", "--json", mnt).stdout)["events"]["listeners"] == 0


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(600)
def test_a_stalled_follower_never_blocks_the_filesystem(layers, mounted):
    n = 10_000
    bottom = layers.lowers[1] / "many"
    bottom.mkdir()
    for i in range(n):
        (bottom / f"f{i}").write_bytes(b"x")
    mnt = mounted(extra="volatile")
    follower = subprocess.Popen([UNIONFS, "events", "-f", "--json", str(mnt)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def listening():
            return json.loads(cli("stats", "--json", mnt).stdout)["events"]["listeners"] == 1
        deadline = time.monotonic() + 30
        while not listening():
            assert time.monotonic() < deadline, "the follower never connected"
            time.sleep(0.05)
        os.kill(follower.pid, signal.SIGSTOP)
        for i in range(n):                          # 10,000 copy-ups, 10,000 events
            with open(mnt / "many" / f"f{i}", "ab") as f:
                f.write(b"y")
        assert len(os.listdir(mnt / "many")) == n   # still answering
        stats = json.loads(cli("stats", "--json", mnt).stdout)
        assert stats["copy_up"]["count"] >= n
        assert stats["events"]["listeners"] == 1 and stats["events"]["dropped"] > 0
        # Resumed, the follower is told how much it missed.
        os.kill(follower.pid, signal.SIGCONT)
        dropped = None
        for line in follower.stdout:
            obj = json.loads(line)
            if "dropped" in obj:
                dropped = obj["dropped"]
                break
        assert dropped is not None and dropped > 0
    finally:
        os.kill(follower.pid, signal.SIGCONT)
        follower.kill()
        follower.wait(timeout=30)
    # The follower's connection is gone: nothing listens any more.
    deadline = time.monotonic() + 30
    while json.loads(cli("stats", "--json", mnt).stdout)["events"]["listeners"] != 0:
        assert time.monotonic() < deadline, "the dead follower was never dropped"
        time.sleep(0.1)


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_image_containers_by_name_with_diff_id_and_history(tmp_path):
    store = tmp_path / "store"
    base = layer_tar(D("etc"), F("etc/motd", b"hello\n"), F("etc/issue", b"v1\n"))
    change = layer_tar(D("etc"), F("etc/issue", b"v2\n"))
    docker_archive(tmp_path / "img.tar", [base, change], tags=["watch/img:1"])
    cli("image", "load", "--store", store, "-q", tmp_path / "img.tar")
    mnt = tmp_path / "rootfs"
    mnt.mkdir()
    cli("image", "mount", "--store", store, "watch/img:1", mnt, "--name", "web")
    try:
        from image_helpers import sha
        lines = cli("which", mnt / "etc/issue", mnt / "etc/motd").stdout.splitlines()
        assert lines[0].startswith(f"{mnt}/etc/issue: lower 1 {store}/layers/")
        assert lines[1] == f"  layer {sha(change)} created by: layer 1"
        assert lines[2].startswith(f"{mnt}/etc/motd: lower 2 {store}/layers/")
        assert lines[3] == f"  layer {sha(base)} created by: layer 0"
        with open(mnt / "etc/motd", "a") as f:
            f.write("more\n")
        info = json.loads(cli("which", "--json", mnt / "etc/motd").stdout)
        assert info["layer"] == "upper" and info["copied_up"]
        assert info["image_layer"] == {"diff_id": sha(base), "created_by": "layer 0"}
        # By name: the container's events and stats.
        events = [json.loads(x) for x in cli("events", "--store", store, "--json", "web").stdout.splitlines()]
        assert [(e["kind"], e["path"], e["bytes"]) for e in events] == [
            ("copy-up", "/etc", 0), ("copy-up", "/etc/motd", 6)]       # parents first
        stats = json.loads(cli("stats", "--store", store, "--json", "web").stdout)
        assert (stats["copy_up"]["count"], stats["copy_up"]["bytes"]) == (2, 6)
        assert "no such mount point or container" in one_line_error(
            cli("events", "--store", store, "nosuch", check=False))
    finally:
        force_unmount(str(mnt))
    assert "not mounted" in one_line_error(cli("stats", "--store", store, "web", check=False))


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_stats_watch_redraws_in_place_on_a_terminal(tree, mounted):
    import pty
    mnt = mounted()
    (mnt / "top.txt").read_text()
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: on the terminal
        try:
            os.execve(UNIONFS, [UNIONFS, "stats", "--watch", str(mnt)], dict(os.environ, TERM="xterm"))
        finally:
            os._exit(127)
    out = b""
    try:
        deadline = time.monotonic() + 60
        # Two screens: the first, then a redraw that moved the cursor up.
        while out.count(b"request ") < 2 and time.monotonic() < deadline:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    finally:
        os.kill(pid, signal.SIGINT)
        os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert text.count(f"{mnt}: up ") >= 2 and "\x1b[1A" in text, text[-2000:]
    assert "lookup" in text


def test_bad_input_gets_one_line(tmp_path):
    assert "no such mount point or container" in one_line_error(
        cli("events", tmp_path / "nope", check=False))
    assert "not a unionfs mount point" in one_line_error(cli("stats", tmp_path, check=False))
    assert "no such mount point or container" in one_line_error(
        cli("stats", "--store", tmp_path / "store", "nosuchname", check=False))
    assert "not inside a unionfs mount" in one_line_error(cli("which", tmp_path, check=False))
    assert "needs a terminal" in one_line_error(cli("stats", "--watch", tmp_path, check=False))


def test_prune_removes_sockets_only_of_killed_daemons(tmp_path, monkeypatch):
    """A daemon killed before it wrote its pidfile leaves only its control
    socket: the next mount's prune removes it, but never a socket something
    still listens on (a daemon that is starting)."""
    import importlib
    import socket as socketmod

    from unionfs import control
    mountmod = importlib.import_module("unionfs.mount")    # `unionfs.mount` is the API's function
    monkeypatch.setattr(mountmod, "_runtime_dir", lambda: str(tmp_path))
    stale, live = tmp_path / ("a" * 24 + control.SUFFIX), tmp_path / ("b" * 24 + control.SUFFIX)
    dead = socketmod.socket(socketmod.AF_UNIX)
    dead.bind(str(stale))
    dead.close()                    # the file stays; connecting is refused
    listening = socketmod.socket(socketmod.AF_UNIX)
    listening.bind(str(live))
    listening.listen(1)
    other = tmp_path / "notes.sock"  # not a control socket's name: not ours
    other.write_text("")
    try:
        mountmod.prune_pidfiles()
        assert not stale.exists()
        assert live.exists() and other.exists()
    finally:
        listening.close()
