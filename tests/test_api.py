"""The Python API (DESIGN.md §10): unionfs.mount -> Mount, images.Store, and
the UnionfsError hierarchy, on real mounts; each test compares with what the
CLI prints or leaves behind for the same input."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import unionfs
from conftest import UNIONFS, force_unmount, is_mounted, run, wait_for
from image_helpers import D, F, docker_archive, layer_tar
from reliability_helpers import alive, daemon_pid
from unionfs.images import Store

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="/dev/fuse is missing or not accessible")


@pytest.fixture
def tree(tmp_path):
    """Two lowers: base has etc/motd, etc/gone, var/; top has etc/top."""
    top, base = tmp_path / "top", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "motd").write_text("hello\n")
    (base / "etc" / "gone").write_text("x\n")
    (base / "var").mkdir()
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "top").write_text("top\n")
    return [top, base]


@pytest.fixture
def unmount_after():
    """Mounts a test made: unmounted (and their temporary dirs removed)
    whatever happened."""
    mounts = []
    yield mounts
    for m in reversed(mounts):
        try:
            m.unmount()
        except unionfs.UnionfsError:
            m.detach()
        force_unmount(m.path)


def change_things(root):
    root = Path(root)
    (root / "etc" / "motd").write_text("changed\n")
    os.unlink(root / "etc" / "gone")
    (root / "new").mkdir()
    (root / "new" / "file").write_text("n\n")


def test_mount_changes_unmount_temp_dirs(tree, unmount_after):
    with unionfs.mount(tree) as m:
        unmount_after.append(m)
        assert is_mounted(m.path)
        pid = daemon_pid(m.path)
        assert sorted(os.listdir(m.path)) == ["etc", "var"]
        change_things(m.path)
        changes = m.changes()
        # The same lines as `unionfs diff UPPER --lowerdir TOP:BASE` prints.
        r = run([UNIONFS, "diff", m.upper, "--lowerdir", ":".join(map(str, tree))])
        assert r.returncode == 0, r.stderr
        assert [str(c) for c in changes] == r.stdout.splitlines()
        assert [(c.kind, c.path) for c in changes] == [
            ("C", "/etc"), ("D", "/etc/gone"), ("C", "/etc/motd"), ("A", "/new"), ("A", "/new/file")]
        upper, work = m.upper, m.work
    assert not is_mounted(m.path) and not m.mounted
    assert not alive(pid)
    assert not os.path.exists(m.path)
    assert not os.path.exists(upper) and not os.path.exists(work)
    assert (tree[1] / "etc" / "motd").read_text() == "hello\n"      # lowers untouched
    m.unmount()                                                     # idempotent


def test_context_manager_unmounts_on_exception(tree, unmount_after):
    with pytest.raises(RuntimeError, match="inside"):
        with unionfs.mount(tree) as m:
            unmount_after.append(m)
            pid = daemon_pid(m.path)
            (Path(m.path) / "f").write_text("x")
            raise RuntimeError("inside the with block")
    assert not is_mounted(m.path)
    assert not alive(pid)
    assert not os.path.exists(m.path) and not os.path.exists(m.upper)


def test_exception_with_a_file_left_open_still_unmounts(tree, unmount_after):
    """The traceback's frame keeps the file open: the mount is busy at
    __exit__, and is detached lazily so the block's own exception shows."""
    with pytest.raises(ValueError, match="the block's"):
        with unionfs.mount(tree) as m:
            unmount_after.append(m)
            kept = open(Path(m.path) / "etc" / "motd")  # noqa: F841 (held by the frame)
            raise ValueError("the block's own error")
    assert not is_mounted(m.path) and not m.mounted


def test_given_dirs_are_kept_and_options_apply(tree, tmp_path, unmount_after):
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (upper, work, mnt):
        d.mkdir()
    m = unionfs.mount(tree, upper, work, mnt, whiteout="oci", volatile=True, threaded=False)
    unmount_after.append(m)
    assert m.path == str(mnt) and m.upper == str(upper)
    os.unlink(mnt / "etc" / "gone")
    assert (upper / "etc" / ".wh.gone").exists()        # whiteout="oci" reached the daemon
    m.unmount()
    m.unmount()
    assert not is_mounted(mnt)
    assert mnt.is_dir() and (upper / "etc" / ".wh.gone").exists()
    assert [str(c) for c in m.changes()] == ["C /etc", "D /etc/gone"]   # the upper is the user's


def test_read_only_option(tree, unmount_after):
    with unionfs.mount(tree, ro=True) as m:
        unmount_after.append(m)
        with pytest.raises(OSError) as e:
            (Path(m.path) / "x").write_text("x")
        assert e.value.errno == 30      # EROFS


def cli_error(*args):
    """The one line `unionfs mount` prints for the same input, without 'unionfs: '."""
    r = run([UNIONFS, "mount", *args])
    assert r.returncode == 1 and r.stderr.startswith("unionfs: "), r.stderr
    return r.stderr.strip()[len("unionfs: "):]


@pytest.mark.parametrize("case", ["missing lower", "unknown option", "upper without work",
                                  "overlap", "bad whiteout"])
def test_errors_are_mount_errors_with_cli_messages(case, tree, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = str(tree[1])
    kwargs, cli = {}, [f"lowerdir={lower}"]
    if case == "missing lower":
        lower = str(tmp_path / "nope")
        cli = [f"lowerdir={lower}"]
    elif case == "unknown option":
        kwargs, cli = {"frobnicate": True}, cli + ["frobnicate"]
    elif case == "upper without work":
        kwargs, cli = {"upper": tmp_path}, cli + [f"upperdir={tmp_path}"]
    elif case == "overlap":
        mnt = tree[1] / "var"
    elif case == "bad whiteout":
        kwargs, cli = {"whiteout": "aufs"}, cli + ["whiteout=aufs"]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(unionfs.MountError) as e:
        unionfs.mount([lower], mountpoint=mnt, **kwargs)
    assert isinstance(e.value, unionfs.UnionfsError)
    assert str(e.value) == cli_error("-o", ",".join(cli), str(mnt))
    assert not is_mounted(mnt)
    assert sorted(os.listdir(tmp_path)) == before


def test_failed_mount_removes_its_temp_dirs(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)      # re-read TMPDIR
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "file").write_text("a mount point must be a directory: this one is fine, "
                              "the layer below is not")
    with pytest.raises(unionfs.MountError, match="not a directory"):
        unionfs.mount([mnt / "file"])
    with pytest.raises(unionfs.MountError, match="overlaps"):
        unionfs.mount([tree[1]], mountpoint=tree[1])
    assert os.listdir(tmp_path / "tmp") == []


def test_fuse_unavailable_error_without_dev_fuse(tree):
    """Where /dev/fuse is missing (here: hidden in a private mount namespace)
    mount() raises FuseUnavailableError, with the CLI's message."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    code = ("import unionfs, sys\n"
            "try:\n"
            f"    unionfs.mount([{str(tree[1])!r}])\n"
            "except unionfs.FuseUnavailableError as e:\n"
            "    print(type(e).__name__, isinstance(e, unionfs.MountError), e)\n")
    r = subprocess.run(["unshare", "-m", "--", "sh", "-c",
                        'mount --make-rprivate / && mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec "$@"', "sh",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("FuseUnavailableError True /dev/fuse is missing: "
                                "this machine cannot mount FUSE filesystems")


def test_busy_unmount_raises_unmount_error_and_keeps_the_mount(tree, unmount_after):
    m = unionfs.mount(tree)
    unmount_after.append(m)
    f = open(Path(m.path) / "etc" / "motd")
    try:
        with pytest.raises(unionfs.UnmountError, match="busy"):
            m.unmount()
        assert m.mounted and is_mounted(m.path)
    finally:
        f.close()
    m.unmount()
    assert not is_mounted(m.path) and not os.path.exists(m.upper)


def test_a_daemon_holds_nothing_of_its_maker(tree, unmount_after):
    """A file open in mount A while mount B is made must not keep A busy
    once it is closed (B's daemon is forked from this process)."""
    a = unionfs.mount(tree)
    unmount_after.append(a)
    f = open(Path(a.path) / "etc" / "motd")
    b = unionfs.mount(tree)
    unmount_after.append(b)
    f.close()
    a.unmount()
    assert not is_mounted(a.path) and b.mounted
    b.unmount()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_ends_cleanly_on_signal_whatever_its_maker_handled(sig, tree, tmp_path, unmount_after):
    """The daemon is forked from the caller, whose Python handlers it must
    not run: SIGTERM/SIGINT to it unmount cleanly (libfuse's handlers)."""
    ran = tmp_path / "caller's handler ran"
    previous = signal.signal(sig, lambda *_: ran.write_text(str(os.getpid())))
    try:
        m = unionfs.mount(tree)
    finally:
        signal.signal(sig, previous)
    unmount_after.append(m)
    pid = daemon_pid(m.path)
    os.kill(pid, sig)
    assert wait_for(lambda: not is_mounted(m.path), timeout=10)
    assert wait_for(lambda: not alive(pid), timeout=10)
    assert not ran.exists()
    m.unmount()
    assert not os.path.exists(m.upper)


def test_unmounted_from_outside_is_fine(tree, unmount_after):
    m = unionfs.mount(tree)
    unmount_after.append(m)
    r = run([UNIONFS, "umount", m.path])
    assert r.returncode == 0, r.stderr
    assert not m.mounted
    m.unmount()
    assert not os.path.exists(m.path)


def test_cli_still_prints_one_line_with_exit_1(tmp_path):
    """UserError is UnionfsError: the CLI's handling did not change."""
    from unionfs.errors import UserError
    assert UserError is unionfs.UnionfsError
    assert issubclass(unionfs.FuseUnavailableError, unionfs.MountError)
    r = run([UNIONFS, "mount", "-o", f"lowerdir={tmp_path}/nope", str(tmp_path)])
    assert (r.returncode, r.stderr) == (1, f"unionfs: lowerdir {tmp_path}/nope: no such directory\n")


def test_import_unionfs_is_cheap_and_mount_stays_the_function():
    code = ("import sys, unionfs\n"
            "heavy = sorted(m for m in sys.modules if m.startswith('unionfs.') and m != 'unionfs.errors')\n"
            "typing = 'typing' in sys.modules\n"
            "import unionfs.mount\n"
            "from unionfs.mount import MountSpec\n"
            "print(heavy, callable(unionfs.mount), unionfs.mount.__module__, typing)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["[]", "True", "unionfs.api", "False"], r.stderr


# -- images.Store ------------------------------------------------------------------

@pytest.fixture
def archive(tmp_path):
    base = layer_tar(D("etc"), F("etc/motd", b"hello\n"), F("etc/hostname", b"box\n"), D("app"))
    top = layer_tar(D("app"), F("app/VERSION", b"1\n"))
    path = tmp_path / "img.tar"
    docker_archive(path, [base, top], tags=("apitest:v1",))
    return path


def test_store_load_mount_commit_save(archive, tmp_path, unmount_after):
    store = Store(tmp_path / "store")
    [image] = store.load(archive)
    assert image.names == ["apitest:v1"]
    assert [i.id for i in store.images()] == [image.id]
    with store.mount("apitest:v1", name="c1") as m:
        unmount_after.append(m)
        assert m.name == "c1"
        root = Path(m.path)
        assert (root / "app" / "VERSION").read_text() == "1\n"
        (root / "app" / "VERSION").write_text("2\n")
        os.unlink(root / "etc" / "hostname")
        assert [str(c) for c in m.changes()] == ["C /app", "C /app/VERSION", "C /etc", "D /etc/hostname"]
        # `unionfs diff c1` prints the same lines.
        r = run([UNIONFS, "diff", "--store", str(tmp_path / "store"), "c1"])
        assert r.stdout.splitlines() == [str(c) for c in m.changes()]
    assert not is_mounted(m.path) and not os.path.exists(m.path)
    new = store.commit(m, "apitest:v2", message="bump")
    assert store.image("apitest:v2").id == new.id and len(new.layers) == 3
    out = tmp_path / "v2.tar"
    store.save("apitest:v2", out)
    # What was saved loads into another store, with the change in its top layer.
    other = Store(tmp_path / "other")
    [again] = other.load(out)
    assert again.id == new.id
    with other.mount("apitest:v2", remove=True) as m2:
        unmount_after.append(m2)
        assert (Path(m2.path) / "app" / "VERSION").read_text() == "2\n"
        assert not (Path(m2.path) / "etc" / "hostname").exists()
        container = m2.name
    r = run([UNIONFS, "ps", "-q", "--store", str(tmp_path / "other")])
    assert container not in r.stdout.split()


def test_store_errors(archive, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(unionfs.ImageError) as e:
        store.load(tmp_path / "missing.tar")
    r = run([UNIONFS, "image", "load", "--store", str(tmp_path / "store"), str(tmp_path / "missing.tar")])
    assert f"unionfs: {e.value}\n" == r.stderr
    with pytest.raises(unionfs.ImageError, match="no such image"):
        store.mount("nope:latest")
    store.load(archive)
    with pytest.raises(unionfs.MountError, match="no such directory"):
        store.mount("apitest:v1", mountpoint=tmp_path / "missing")
    r = run([UNIONFS, "ps", "-q", "--store", str(tmp_path / "store")])
    assert r.stdout == ""                       # the failed mount's container is gone
    with pytest.raises(unionfs.ImageError, match="no such container"):
        store.commit("nobody", "x:y")
    with pytest.raises(unionfs.ImageError, match="format"):
        store.save("apitest:v1", tmp_path / "o.tar", format="zip")


# -- images.Store: run, push, pull (real runc, a real registry) ------------------

def _runtime_missing() -> str | None:
    from container_helpers import runtime_missing_reason
    from registry_helpers import REGISTRY_BIN
    return runtime_missing_reason() or (None if REGISTRY_BIN else "docker-registry is not installed")


needs_runtime_and_registry = pytest.mark.skipif(_runtime_missing() is not None, reason=_runtime_missing() or "")


@pytest.fixture
def busy_stores(tmp_path):
    """Store A holding the busybox test image, an empty store B, and a plain
    http registry; every container is removed and the registry stopped."""
    from container_helpers import Engine, write_test_image
    from registry_helpers import start_registry
    a, b = Engine(tmp_path / "a"), Engine(tmp_path / "b")
    a("image", "load", "-q", write_test_image(tmp_path / "busy.tar", "busy:1"))
    reg = start_registry("plain", tmp_path / "registry")
    try:
        yield Store(a.store), Store(b.store), a, b, reg
    finally:
        reg.stop()
        assert a.close() == [] and b.close() == []


def zombie_children() -> set[int]:
    """Exited children of this process nobody collected."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            out.add(int(stat.parent.name))
    return out


@needs_runtime_and_registry
def test_store_run_push_pull(busy_stores):
    a, b, cli_a, cli_b, reg = busy_stores
    zombies = zombie_children()
    r = a.run("busy:1", ["sh", "-c", "echo out; echo err >&2; exit 3"], env=["X=1"])
    assert (r.exit_code, r.output) == (3, "out\nerr\n")
    assert a.run("busy:1").output == cli_a("run", "--rm", "busy:1").stdout == "hello from /app\n"
    assert cli_a.containers() == []                     # removed, as --rm
    assert zombie_children() <= zombies                 # its monitor and daemon were collected

    kept = a.run("busy:1", ["sh", "-c", "echo $X > /app/msg"], rm=False, name="kept", env=["X=from A"])
    assert (kept.exit_code, kept.name, cli_a.containers()) == (0, "kept", ["kept"])
    ref = f"{reg.host}/api/kept:v1"
    image = a.commit("kept", ref)
    digest = a.push(ref, tls_verify=False)
    assert digest.startswith("sha256:") and reg.requests("PUT", "/manifests/v1") == 1
    assert b.pull(ref, tls_verify=False).id == image.id
    assert b.run(ref, ["cat", "/app/msg"]).output == cli_b("run", "--rm", ref, "cat", "/app/msg").stdout \
        == "from A\n"
    assert cli_b.containers() == []


@needs_runtime_and_registry
def test_store_run_push_pull_errors(busy_stores):
    a, b, cli_a, cli_b, reg = busy_stores

    def cli_line(r):
        assert r.returncode != 0 and r.stderr.startswith("unionfs: "), r.stderr
        return r.stderr.strip()[len("unionfs: "):]

    with pytest.raises(unionfs.ImageError) as e:
        a.run("nope:1")
    assert str(e.value) == cli_line(cli_a("run", "--rm", "nope:1", check=False))
    with pytest.raises(unionfs.ContainerError) as e:
        a.run("busy:1", ["no-such-command"])
    assert str(e.value) == cli_line(cli_a("run", "--rm", "busy:1", "no-such-command", check=False))
    with pytest.raises(unionfs.ContainerError) as e:
        a.run("busy:1", ["true"], workdir="relative")
    assert str(e.value) == cli_line(cli_a("run", "--rm", "-w", "relative", "busy:1", "true", check=False))
    with pytest.raises(TypeError):
        a.run("busy:1", ["true"], tty=True)
    assert cli_a.containers() == []                     # nothing left of what did not run

    missing = f"{reg.host}/api/missing:v1"
    with pytest.raises(unionfs.ImageError) as e:
        b.pull(missing, tls_verify=False)
    assert str(e.value) == cli_line(cli_b("pull", "--tls-verify=false", "-q", missing, check=False))
    with pytest.raises(unionfs.ImageError) as e:
        a.push("busy:1")                                # its name names no registry
    assert str(e.value) == cli_line(cli_a("push", "-q", "busy:1", check=False))
    with pytest.raises(unionfs.ImageError) as e:
        a.push("busy:1", f"{reg.host}/api/busy:1")      # https, but the registry speaks http
    assert str(e.value) == cli_line(cli_a("push", "-q", "busy:1", f"{reg.host}/api/busy:1", check=False))
    assert b.images() == []
