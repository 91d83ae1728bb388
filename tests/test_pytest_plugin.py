"""The pytest plugin (unionfs/pytest_plugin.py), run as users run it: inner
pytest sessions (pytester, in subprocesses) that load it through its entry
point. After each, nothing may be left: no mount in /proc/mounts, no daemon
(every daemon is a fork of the inner pytest, so its command line names the
inner session's directory), no temporary directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import UNIONFS, run, wait_for
from image_helpers import D, F, docker_archive, layer_tar

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="/dev/fuse is missing or not accessible")

# The inner test: mounts a lower through the fixture, records the mount
# point, changes a file and checks changes(); then {ending}.
INNER = '''
import os, time
from pathlib import Path

RECORD = Path(__file__).with_name("mounts.txt")

def test_it(union_mount, tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("lower")
    m = union_mount([lower])
    with open(RECORD, "a") as f:
        f.write(m.path + "\\n" + m.upper + "\\n")
    (Path(m.path) / "f").write_text("changed")
    assert [str(c) for c in m.changes()] == ["C /f"]
    {ending}
'''


def mounted_paths():
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f}


def processes_naming(marker):
    """Live processes whose command line contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(pid), cmdline))
    return found


def recorded(pytester):
    record = pytester.path / "mounts.txt"
    assert record.exists(), "the inner test did not get as far as mounting"
    return record.read_text().split()


def assert_nothing_left(pytester):
    paths = recorded(pytester)
    assert paths
    assert not mounted_paths() & set(paths), "a mount was left behind"
    assert wait_for(lambda: not processes_naming(str(pytester.path)), timeout=10), \
        f"daemons left behind: {processes_naming(str(pytester.path))}"
    assert not [p for p in paths if os.path.exists(p)], "temporary directories left behind"


def inner(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


@pytest.mark.parametrize("ending, outcome", [
    ("pass", {"passed": 1}),
    ("assert False, 'failing on purpose'", {"failed": 1}),
])
def test_passing_and_failing_tests_leave_nothing(pytester, ending, outcome):
    pytester.makepyfile(INNER.format(ending=ending))
    result = inner(pytester)
    result.assert_outcomes(**outcome)
    assert_nothing_left(pytester)


def test_keyboard_interrupt_inside_a_test_leaves_nothing(pytester):
    pytester.makepyfile(INNER.format(ending="raise KeyboardInterrupt"))
    result = inner(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert_nothing_left(pytester)


def popen_pytest(pytester, path, tag):
    out = open(pytester.path / f"{tag}.out", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={pytester.path / tag}",
         str(path)], cwd=pytester.path, stdout=out, stderr=subprocess.STDOUT), out


@pytest.mark.parametrize("sig, returncode", [(signal.SIGINT, pytest.ExitCode.INTERRUPTED),
                                             (signal.SIGTERM, -signal.SIGTERM)])
def test_killed_run_leaves_nothing(pytester, sig, returncode):
    """pytest killed mid-test: SIGINT (pytest's KeyboardInterrupt, then its
    teardown) and SIGTERM (which ends pytest without a teardown: the plugin's
    handler unmounts first)."""
    path = pytester.makepyfile(INNER.format(ending="time.sleep(120)"))
    p, out = popen_pytest(pytester, path, "run")
    try:
        assert wait_for(lambda: len(recorded_or_empty(pytester)) == 2 and
                        recorded_or_empty(pytester)[0] in mounted_paths(), timeout=60), \
            (pytester.path / "run.out").read_text()
        time.sleep(0.2)             # inside the sleep, past the assertion
        p.send_signal(sig)
        assert p.wait(timeout=60) == returncode, (pytester.path / "run.out").read_text()
    finally:
        if p.poll() is None:
            p.kill()
        out.close()
    assert_nothing_left(pytester)


def recorded_or_empty(pytester):
    record = pytester.path / "mounts.txt"
    return record.read_text().split() if record.exists() else []


PARALLEL = '''
import os, time
from pathlib import Path

HERE = Path(__file__).parent

def wait_for(path):
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{{path}} never appeared"
        time.sleep(0.05)

def test_{me}(union_mount, tmp_path):
    lower = tmp_path / "lower"
    (lower / "shared").mkdir(parents=True)
    (lower / "shared" / "who").write_text("{me}")
    m = union_mount([lower])
    with open(HERE / "mounts.txt", "a") as f:
        f.write(m.path + "\\n")
    (HERE / "{me}.mounted").write_text(m.path)
    wait_for(HERE / "{other}.mounted")      # both mounted at once from here on
    assert m.path != (HERE / "{other}.mounted").read_text()
    root = Path(m.path)
    (root / "shared" / "{me}-was-here").write_text("{me}")
    (root / "shared" / "who").write_text("{me} changed it")
    (HERE / "{me}.wrote").write_text("")
    wait_for(HERE / "{other}.wrote")
    assert sorted(os.listdir(root / "shared")) == ["{me}-was-here", "who"]
    assert (root / "shared" / "who").read_text() == "{me} changed it"
    assert [str(c) for c in m.changes()] == ["C /shared", "A /shared/{me}-was-here", "C /shared/who"]
    assert (lower / "shared" / "who").read_text() == "{me}"
'''


def test_two_runs_in_parallel_do_not_interfere(pytester):
    a = pytester.makepyfile(test_a=PARALLEL.format(me="a", other="b"))
    b = pytester.makepyfile(test_b=PARALLEL.format(me="b", other="a"))
    runs = [popen_pytest(pytester, a, "a"), popen_pytest(pytester, b, "b")]
    try:
        codes = [p.wait(timeout=120) for p, _ in runs]
    finally:
        for p, out in runs:
            if p.poll() is None:
                p.kill()
            out.close()
    assert codes == [0, 0], (pytester.path / "a.out").read_text() + (pytester.path / "b.out").read_text()
    assert "1 passed" in (pytester.path / "a.out").read_text()
    assert "1 passed" in (pytester.path / "b.out").read_text()
    assert len(recorded(pytester)) == 2
    assert_nothing_left(pytester)


@pytest.fixture
def archive(tmp_path):
    base = layer_tar(D("etc"), F("etc/motd", b"hello\n"), D("app"), F("app/VERSION", b"1\n"))
    path = tmp_path / "img.tar"
    docker_archive(path, [base], tags=("plugintest:v1",))
    return path


IMAGE_ROOTFS = '''
from pathlib import Path

RECORD = Path(__file__).with_name("mounts.txt")

def check(m):
    with open(RECORD, "a") as f:
        f.write(m.path + "\\n")
    root = Path(m.path)
    assert (root / "etc" / "motd").read_text() == "hello\\n"
    (root / "app" / "VERSION").write_text("2\\n")
    assert [str(c) for c in m.changes()] == ["C /app", "C /app/VERSION"]

def test_from_archive(image_rootfs):
    check(image_rootfs({archive!r}))

def test_from_archive_again(image_rootfs):
    check(image_rootfs({archive!r}))          # a fresh container: the change above is gone

def test_from_store(image_rootfs):
    check(image_rootfs("plugintest:v1", store={store!r}))
'''


def test_image_rootfs_from_archive_and_store(pytester, archive, tmp_path):
    store = tmp_path / "store"
    r = run([UNIONFS, "image", "load", "--store", str(store), str(archive)])
    assert r.returncode == 0, r.stderr
    pytester.makepyfile(IMAGE_ROOTFS.format(archive=str(archive), store=str(store)))
    result = inner(pytester)
    result.assert_outcomes(passed=3)
    assert_nothing_left(pytester)
    r = run([UNIONFS, "ps", "-q", "--store", str(store)])
    assert r.stdout == "", "image_rootfs left its container in the store"


def test_busy_mount_at_teardown_is_detached_and_reported(pytester):
    pytester.makepyfile(INNER.format(ending='globals()["kept"] = open(Path(m.path) / "f")  # never closed'))
    result = inner(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["unionfs mounts still in use at teardown:",
                                 "*/unionfs-mnt-* is busy (a process still uses it); detached lazily"])
    paths = recorded(pytester)
    assert not mounted_paths() & set(paths)
    assert wait_for(lambda: not processes_naming(str(pytester.path)), timeout=10)


def test_skipped_with_the_reason_where_fuse_is_missing(pytester):
    """Only where FUSE is absent (here: /dev hidden in a private mount
    namespace) are the fixtures' tests skipped, with that reason."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    path = pytester.makepyfile(INNER.format(ending="pass"))
    r = subprocess.run(["unshare", "-m", "--", "sh", "-c",
                        'mount --make-rprivate / && mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec "$@"', "sh",
                        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                        f"--basetemp={pytester.path / 'bt'}", str(path)],
                       cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout
    assert "/dev/fuse is missing: this machine cannot mount FUSE filesystems" in r.stdout


def test_readme_example_is_the_example_file():
    """The README's complete example test is examples/test_fixture_tree.py's
    test (so running the examples runs the README's test)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = (Path(__file__).parent.parent / "examples" / "test_fixture_tree.py").read_text()
    block = readme_example(readme)
    body = example[example.index("from pathlib import Path"):]
    assert block.strip() == body.strip()


def readme_example(readme):
    """The first ```python block of the README's "Use from Python and pytest"
    section that holds a test."""
    section = readme[readme.index("## Use from Python and pytest"):]
    for chunk in section.split("```python")[1:]:
        code = chunk.split("```")[0]
        if "def test_" in code:
            return code
    raise AssertionError("no example test in the README section")


def test_examples_run(tmp_path):
    """Both examples, as a user runs them."""
    repo = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        f"--basetemp={tmp_path / 'bt'}", "--rootdir", str(repo / "examples"),
                        str(repo / "examples" / "test_fixture_tree.py")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    if not any(os.path.exists(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox-static is not installed (the demo image needs it)")
    demo = tmp_path / "demo.tar"
    r = subprocess.run([sys.executable, str(repo / "scripts" / "make_demo_image.py"), "-o", str(demo)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "built.tar"
    r = subprocess.run([sys.executable, str(repo / "examples" / "image_commit.py"), str(demo),
                        "--store", str(tmp_path / "store"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["C /app", "A /app/artifact", "C /etc", "D /etc/motd"], r.stdout
    assert lines[4].startswith("committed sha256:") and lines[5] == f"saved {out}"
    # The committed image has the step's result and lost /etc/motd.
    r = run([UNIONFS, "image", "history", "--store", str(tmp_path / "store"), "example:built"])
    assert "example: mkdir -p /app" in r.stdout
    assert out.stat().st_size > 0


UNPRIVILEGED = '''
import os
from pathlib import Path

def test_it(union_mount, tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("lower")
    m = union_mount([lower])
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == m.path)
    Path(__file__).with_name("seen.txt").write_text(f"{os.getuid()}\\n{m.path}\\n{line}")
    (Path(m.path) / "f").write_text("changed")
    (Path(m.path) / "new").write_text("new")
    assert [str(c) for c in m.changes()] == ["C /f", "A /new"]
    assert os.stat(Path(m.upper) / "new").st_uid == os.getuid()
'''


@pytest.mark.parametrize("dev_fuse", ["usable", "root-only"])
def test_unprivileged_user(dev_fuse):
    """As an unprivileged user (nobody) the fixture mounts through the
    set-uid fusermount3 where /dev/fuse allows the user; where it does not,
    the test is skipped, saying so. Like tests/test_rootless.py, a private
    mount namespace binds a 0666 node over a root-only /dev/fuse for the
    "usable" case, and uses /dev/fuse as it is for "root-only"."""
    from test_rootless import GID, REPO, SITE, UID, _python_for_user, _why_not
    why = _why_not()
    if why:
        pytest.skip(why)
    fuse_st = os.stat("/dev/fuse")
    if dev_fuse == "root-only" and fuse_st.st_mode & 0o006:
        pytest.skip("/dev/fuse is usable by every user on this machine")
    import shutil
    import stat
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="unionfs-plugin-user-"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir()
        (home / "test_user.py").write_text(UNPRIVILEGED)
        os.chown(home, UID, GID)
        os.chown(home / "test_user.py", UID, GID)
        setup = ""
        if dev_fuse == "usable" and fuse_st.st_mode & 0o006 != 0o006:
            node = base / "fuse"
            os.mknod(node, stat.S_IFCHR | 0o666, fuse_st.st_rdev)
            os.chmod(node, 0o666)
            setup = f"mount --bind {node} /dev/fuse && "
        boot = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {SITE!r}]; import pytest; "
                f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '-rs', '--basetemp={home}/bt', "
                f"'{home}/test_user.py']))")
        run_dir = base / "run"
        run_dir.mkdir()
        os.chown(run_dir, UID, GID)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_RUNTIME_DIR": str(run_dir),
               "TMPDIR": str(home), "LANG": "C.UTF-8"}
        user = (f"exec setpriv --reuid={UID} --regid={GID} --clear-groups -- "
                f"{_python_for_user()} -c \"{boot}\"")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                            setup + user], env=env, cwd=home, capture_output=True, text=True,
                           timeout=180)
        if dev_fuse == "root-only":
            assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
            assert f"/dev/fuse is not readable and writable by uid {UID}" in r.stdout
            return
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
        uid, mnt, line = (home / "seen.txt").read_text().split("\n", 2)
        assert uid == str(UID) and f"user_id={UID}" in line     # the user's own daemon
        assert wait_for(lambda: not processes_naming(str(home)), timeout=10)
        assert not os.path.exists(mnt)
        assert not list(home.glob("unionfs-*"))                 # temp upper and mount point gone
        assert not list(run_dir.glob("unionfs-*/*.pid"))        # the daemon's pidfile too
    finally:
        shutil.rmtree(base, ignore_errors=True)
