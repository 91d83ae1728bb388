"""podman runs containers on fuse-unionfs (issue 6).

containers/storage's overlay driver with `mount_program = fuse-unionfs` calls
the program with fuse-overlayfs's argv for every container rootfs and, for
`podman commit`, mounts the container and its parent image to compute the new
layer. These tests drive real podman + runc through that path: import a
busybox rootfs, run it, change files and directories in a container, commit,
run the committed image, commit again on top, and check every step sees
exactly the tree it should.

The mount program is fuse-unionfs from this project unless
$UNIONFS_PODMAN_MOUNT_PROGRAM names another (e.g. fuse-overlayfs, to compare).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest

from elf_helpers import EXIT_IF_NOBODY, EXIT_IF_ROOT, euid_program
from podman_helpers import (
    DAEMON_EXIT_TIMEOUT, DIR, LISTING_SCRIPT, MOUNT_PROGRAM_ENV, STATIC_BUSYBOX, PodmanSandbox,
    Symlink,
    busybox_rootfs_tar, docker_archive, expected_listing, is_static_executable,
    mounts_under, processes_mentioning, selected_mount_program, tar_tree,
    unionfs_program, unmount_all_under, wait_for_exit, without, write_tree,
)

HAVE_RUNC = bool(shutil.which("runc")) or os.path.exists("/usr/sbin/runc")

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="these podman tests run as root"),
    pytest.mark.skipif(not shutil.which("podman") or not HAVE_RUNC,
                       reason="podman and runc are not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

BASE_IMAGE = "localhost/unionfs-test/busybox:base"
GEN1_IMAGE = "localhost/unionfs-test/busybox:gen1"
GEN2_IMAGE = "localhost/unionfs-test/busybox:gen2"
LAYERED_IMAGE = "localhost/unionfs-test/layered:1"

# The image's /data before any container touched it.
BASE_TREE = {
    "data/keep.txt": "keep",
    "data/modify.txt": "old",
    "data/delete.txt": "gone",
    "data/chmod.txt": "mode",
    "data/recreated.txt": "v1",
    "data/rename_src.txt": "moved",
    "data/over_src.txt": "src",
    "data/over_dst.txt": "dst",
    "data/file2dir": "file",
    "data/dir2file/x.txt": "x",
    "data/deldir/a/b.txt": "b",
    "data/deldir/c.txt": "c",
    "data/recreate/old1.txt": "old1",
    "data/recreate/sub/old2.txt": "old2",
    "data/recreate_new/old.txt": "old",
    "data/recreate_new/sub/x.txt": "x",
    "data/renamedir/f1.txt": "f1",
    "data/renamedir/sub/f2.txt": "f2",
    "data/nested/deep/stay.txt": "stay",
    "data/nested/deep/remove.txt": "remove",
    "data/link": Symlink("keep.txt"),
    "data/emptydir": DIR,
}

# First container on the base image: every kind of change, one per entry.
GEN1_CHANGES = """
set -e
cd /data
echo new > modify.txt
rm delete.txt
chmod 600 chmod.txt
rm recreated.txt; echo v2 > recreated.txt
mv rename_src.txt rename_dst.txt
mv over_src.txt over_dst.txt
rm file2dir; mkdir file2dir; echo inner > file2dir/inner.txt
rm -r dir2file; echo nowfile > dir2file
rm -r deldir
rm -r recreate; mkdir recreate
rm -r recreate_new; mkdir recreate_new; echo fresh > recreate_new/new.txt
mv renamedir moveddir
rm nested/deep/remove.txt
ln -sfn modify.txt link
rmdir emptydir
mkdir -p newdir/sub; echo hello > newdir/sub/hello.txt
"""

GEN1_TREE = {
    **without(BASE_TREE, "data/modify.txt", "data/delete.txt", "data/chmod.txt",
              "data/recreated.txt", "data/rename_src.txt", "data/over_src.txt",
              "data/over_dst.txt", "data/file2dir", "data/dir2file", "data/deldir",
              "data/recreate", "data/recreate_new", "data/renamedir",
              "data/nested/deep/remove.txt", "data/link", "data/emptydir"),
    "data/modify.txt": "new",
    "data/chmod.txt": ("mode", 0o600),
    "data/recreated.txt": "v2",
    "data/rename_dst.txt": "moved",
    "data/over_dst.txt": "src",
    "data/file2dir/inner.txt": "inner",
    "data/dir2file": "nowfile",
    "data/recreate": DIR,                     # removed and re-created: empty
    "data/recreate_new/new.txt": "fresh",     # removed, re-created, refilled
    "data/moveddir/f1.txt": "f1",
    "data/moveddir/sub/f2.txt": "f2",
    "data/link": Symlink("modify.txt"),
    "data/newdir/sub/hello.txt": "hello",
}

# Second container, on the committed image: changes to entries of both the
# base layer and the layer containers/storage wrote from the first commit
# (its whiteouts, opaque directories and copied-up renames).
GEN2_CHANGES = """
set -e
cd /data
rm keep.txt
rm newdir/sub/hello.txt
rm -r moveddir/sub; mkdir moveddir/sub
echo fresher > recreate_new/new.txt
echo late > recreate/late.txt
mv file2dir file2dir_moved
mkdir deldir
echo back > delete.txt
"""

GEN2_TREE = {
    **without(GEN1_TREE, "data/keep.txt", "data/newdir/sub/hello.txt",
              "data/moveddir/sub", "data/recreate_new/new.txt", "data/file2dir"),
    "data/newdir/sub": DIR,
    "data/moveddir/sub": DIR,                 # re-created over a layer-2 dir: empty
    "data/recreate_new/new.txt": "fresher",
    "data/recreate/late.txt": "late",
    "data/file2dir_moved/inner.txt": "inner",
    "data/deldir": DIR,                       # new dir over a lower whiteout: empty
    "data/delete.txt": "back",                # file over a lower whiteout
}

# A layer as registries ship it (OCI whiteouts and opaque marker), loaded on
# top of the base rootfs. With a mount_program, containers/storage keeps these
# as `.wh.` files in the layer directory (podman 4.3 does), so the mount
# program must honour that format in its lower layers.
WHITEOUT_LAYER = {
    "data/.wh.delete.txt": "",
    "data/.wh.deldir": "",
    "data/nested/deep/.wh.remove.txt": "",
    "data/recreate/.wh..wh..opq": "",
    "data/recreate/fresh.txt": "fresh",
    "data/newfile.txt": "new",
}

LAYERED_TREE = {
    **without(BASE_TREE, "data/delete.txt", "data/deldir", "data/nested/deep/remove.txt",
              "data/recreate"),
    "data/recreate/fresh.txt": "fresh",
    "data/newfile.txt": "new",
}

# A container on that image, changing names the loaded whiteouts hide.
LAYERED_CHANGES = """
set -e
cd /data
echo back > delete.txt
mkdir deldir
rm recreate/fresh.txt; echo more > recreate/more.txt
"""

LAYERED_CHANGED_TREE = {
    **without(LAYERED_TREE, "data/recreate/fresh.txt"),
    "data/delete.txt": "back",
    "data/deldir": DIR,
    "data/recreate/more.txt": "more",
}


def changes_then_listing(changes: str) -> str:
    """A script making CHANGES, then listing $1 as `PodmanSandbox.listing` does."""
    return changes + LISTING_SCRIPT


def fstypes_of(program: str) -> set[str]:
    """The /proc/mounts types a mount by PROGRAM may show (fuse.SUBTYPE)."""
    name = os.path.basename(program)
    # unionfs names its subtype after the project; mount.fuse's type
    # fuse.fuse-unionfs names the program. Either says who serves the mount.
    return {f"fuse.{name}", f"fuse.{name.removeprefix('fuse-')}"}


def assert_tree(seen: list[str], tree: dict, what: str) -> None:
    """SEEN (listing lines) is exactly TREE's /data; else say what differs."""
    expected = expected_listing(tree, "data")
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    assert seen == expected, (f"{what}:\n  missing: {missing}\n  unexpected: {unexpected}")


def _mount_program_or_fail() -> str:
    program = selected_mount_program()
    if program is None:
        pytest.fail(f"mount program not found (${MOUNT_PROGRAM_ENV}="
                    f"{os.environ.get(MOUNT_PROGRAM_ENV, '')!r}; default fuse-unionfs: "
                    "run `pip install -e .` in the venv)")
    return program


def _busybox_or_fail() -> str:
    if not is_static_executable(STATIC_BUSYBOX):
        pytest.fail(f"{STATIC_BUSYBOX} is not a static busybox: install busybox-static")
    return STATIC_BUSYBOX


@pytest.fixture(scope="module")
def rootfs_tar(tmp_path_factory):
    """The base image's rootfs: static busybox plus BASE_TREE."""
    return busybox_rootfs_tar(tmp_path_factory.mktemp("rootfs"), BASE_TREE, _busybox_or_fail())


@pytest.fixture(scope="module")
def podman(rootfs_tar):
    """A podman sandbox on the selected mount program, with the base image imported."""
    sandbox = PodmanSandbox(_mount_program_or_fail())
    try:
        sandbox.run("import", "--quiet", str(rootfs_tar), BASE_IMAGE)
        yield sandbox
    finally:
        complaints = sandbox.close()
    assert not complaints, "\n".join(complaints)


def test_import_and_run(podman):
    out = podman.sh(BASE_IMAGE, 'echo "hello from $(busybox | head -n 1 | cut -d " " -f 1)";'
                    " cat /data/keep.txt /data/nested/deep/stay.txt; readlink /data/link")
    assert out.splitlines() == ["hello from BusyBox", "keep", "stay", "keep.txt"]

    # The container's root really is served by the configured mount program.
    root_type = podman.sh(BASE_IMAGE, "awk '$2 == \"/\" { print $3 }' /proc/mounts").strip()
    assert root_type in fstypes_of(podman.mount_program), root_type

    assert_tree(podman.listing(BASE_IMAGE, "/data"), BASE_TREE, "base image")
    # --rm containers leave neither a mount nor a daemon behind.
    assert mounts_under(podman.base) == []
    assert wait_for_exit(podman.daemons(), 15) == []


def test_commit_twice_and_run(podman):
    """Change, commit, run; change again on the committed image, commit, run."""
    seen = sorted(podman.sh(BASE_IMAGE, changes_then_listing(GEN1_CHANGES), "/data",
                            name="gen1").splitlines())
    assert_tree(seen, GEN1_TREE, "first container after its changes")
    podman.run("commit", "--quiet", "gen1", GEN1_IMAGE)
    assert_tree(podman.listing(GEN1_IMAGE, "/data"), GEN1_TREE, "first committed image")

    seen = sorted(podman.sh(GEN1_IMAGE, changes_then_listing(GEN2_CHANGES), "/data",
                            name="gen2").splitlines())
    assert_tree(seen, GEN2_TREE, "second container after its changes")
    podman.run("commit", "--quiet", "gen2", GEN2_IMAGE)
    assert_tree(podman.listing(GEN2_IMAGE, "/data"), GEN2_TREE, "second committed image")

    # The layers below were never written: older images still show their trees.
    assert_tree(podman.listing(GEN1_IMAGE, "/data"), GEN1_TREE, "first image, afterwards")
    assert_tree(podman.listing(BASE_IMAGE, "/data"), BASE_TREE, "base image, afterwards")

    podman.run("rm", "gen1", "gen2")
    assert mounts_under(podman.base) == []


def test_load_layers_with_whiteouts(podman, rootfs_tar, tmp_path):
    """Whiteouts and opaque dirs unpacked by containers/storage hide what they should."""
    write_tree(tmp_path / "layer", WHITEOUT_LAYER)
    layer_tar = tar_tree(tmp_path / "layer.tar", tmp_path / "layer")
    podman.run("load", "--quiet", "--input",
               str(docker_archive(tmp_path, [rootfs_tar, layer_tar], LAYERED_IMAGE)))
    assert_tree(podman.listing(LAYERED_IMAGE, "/data"), LAYERED_TREE, "loaded two-layer image")
    seen = sorted(podman.sh(LAYERED_IMAGE, changes_then_listing(LAYERED_CHANGES),
                            "/data").splitlines())
    assert_tree(seen, LAYERED_CHANGED_TREE, "container on it, after its changes")


def test_set_uid_program_gets_root_for_a_non_root_user(podman, rootfs_tar, tmp_path):
    """su, sudo and passwd need this: a set-uid root program run as
    `--user 65534` runs with euid 0 (as on fuse-overlayfs and kernel
    overlayfs); the same program without the bit keeps euid 65534."""
    program = euid_program()
    if program is None:
        pytest.skip("no euid test program written for this architecture")
    layer = tmp_path / "layer"
    (layer / "bin").mkdir(parents=True)
    for name, mode in (("euid-setuid", 0o4755), ("euid-plain", 0o755)):
        (layer / "bin" / name).write_bytes(program)
        (layer / "bin" / name).chmod(mode)
    image = "localhost/unionfs-test/setuid:1"
    podman.run("load", "--quiet", "--input",
               str(docker_archive(tmp_path, [rootfs_tar, tar_tree(tmp_path / "layer.tar", layer)], image)))
    out = podman.run("run", "--rm", "--user", "65534", image, "/bin/sh", "-c",
                     "/bin/euid-setuid; echo $?; /bin/euid-plain; echo $?").stdout
    assert out.split() == [str(EXIT_IF_ROOT), str(EXIT_IF_NOBODY)]


# ------------------------------------------------------------ --version

def _fuse_unionfs_or_fail() -> str:
    program = unionfs_program("fuse-unionfs")
    if program is None:
        pytest.fail("fuse-unionfs not found: run `pip install -e .` in the venv")
    return program


def test_version_answers_like_fuse_overlayfs(podman):
    program = _fuse_unionfs_or_fail()
    done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # fuse-overlayfs prints "fuse-overlayfs: version 1.10" among its lines.
    lines = done.stdout.splitlines()
    assert f"fuse-unionfs: version {metadata.version('unionfs')}" in lines
    assert all(re.fullmatch(r"[\w .:-]*version:? [\w.+~-]+", line) for line in lines), lines

    # The engine asks too: podman info reports the mount program's answer.
    if os.path.basename(podman.mount_program) == "fuse-unionfs":
        info = podman.run("info", "--format",
                          '{{ index .Store.GraphOptions "overlay.mount_program" }}').stdout
        assert "fuse-unionfs: version" in info, info


DOCS_PODMAN = Path(__file__).resolve().parent.parent / "docs" / "podman.md"


def test_docs_show_what_podman_info_prints(podman):
    """docs/podman.md's `podman info` example is what podman prints here,
    but for the install path and the exact libfuse release."""
    if os.path.basename(podman.mount_program) != "fuse-unionfs":
        pytest.skip("the example is of fuse-unionfs")
    block = DOCS_PODMAN.read_text().split("```console\n# podman info")[1].split("```")[0]
    documented = block.split("\n", 1)[1].strip()
    info = podman.run("info", "--format",
                      '{{ index .Store.GraphOptions "overlay.mount_program" }}').stdout.strip()
    shown = info.replace(podman.mount_program, "/usr/local/bin/fuse-unionfs")

    def libfuse_major(text):
        return re.sub(r"(FUSE library version \d+)[\d.]*", r"\1", text)
    assert libfuse_major(documented) == libfuse_major(shown)


# ------------------------------------------------------------ mount.fuse

MOUNT_FUSE = shutil.which("mount.fuse") or "/sbin/mount.fuse"


def _mount_via(how: str, program: str, opts: str, mnt: Path) -> list[str]:
    """The command that mounts MNT the way HOW says."""
    if how == "mount.fuse":
        # Exactly what mount(8) runs for `-t fuse.fuse-unionfs`; mount.fuse
        # then runs `fuse-unionfs SOURCE MNT -o OPTS` found on $PATH.
        return [MOUNT_FUSE, "fuse-unionfs", str(mnt), "-t", "fuse.fuse-unionfs", "-o", opts]
    return ["mount", "-t", "fuse", f"{program}#fuse-unionfs", str(mnt), "-o", opts]


def _layers(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """Two lower layers, an upper and a work dir; the mount options; the mount point."""
    top, bottom, upper, work, mnt = (tmp_path / d for d in ("top", "bottom", "upper", "work", "mnt"))
    for d in (top / "d", bottom / "d", upper, work, mnt):
        d.mkdir(parents=True)
    (bottom / "a.txt").write_text("a-bottom\n")
    (bottom / "b.txt").write_text("b-bottom\n")
    (bottom / "d" / "low.txt").write_text("low\n")
    (top / "a.txt").write_text("a-top\n")
    (top / "d" / "high.txt").write_text("high\n")
    return f"lowerdir={top}:{bottom},upperdir={upper},workdir={work}", mnt, upper, bottom


def _cleanup_mount(tmp_path: Path, mnt: Path) -> list[str]:
    """Unmount what is left below TMP_PATH; stop the daemon this test started for MNT."""
    leftovers = unmount_all_under(tmp_path)
    for pid in wait_for_exit(processes_mentioning(str(mnt)), 10):
        os.kill(pid, signal.SIGTERM)
    return leftovers


@pytest.mark.parametrize("how", ["mount.fuse", "mount -t fuse PROG#SOURCE"])
def test_mount_through_mount_fuse(tmp_path, how):
    program = _fuse_unionfs_or_fail()
    if not os.path.exists(MOUNT_FUSE):
        pytest.fail("mount.fuse not found: install fuse3")
    opts, mnt, upper, bottom = _layers(tmp_path)
    env = dict(os.environ, PATH=f"{os.path.dirname(program)}:{os.environ.get('PATH', '')}")
    try:
        done = subprocess.run(_mount_via(how, program, opts, mnt), env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # It returned, so it daemonised; the mount must be live right now.
        assert mounts_under(mnt) == [str(mnt)]
        assert _fstype(mnt) in fstypes_of(program)
        daemons = processes_mentioning(str(mnt))
        assert daemons, "no daemon serves the mount"

        assert sorted(os.listdir(mnt)) == ["a.txt", "b.txt", "d"]
        assert sorted(os.listdir(mnt / "d")) == ["high.txt", "low.txt"]
        assert (mnt / "a.txt").read_text() == "a-top\n"
        (mnt / "b.txt").unlink()
        (mnt / "d" / "low.txt").write_text("changed\n")
        assert sorted(os.listdir(mnt)) == ["a.txt", "d"]
        assert (upper / "d" / "low.txt").read_text() == "changed\n"
        assert (bottom / "b.txt").read_text() == "b-bottom\n"
        assert (bottom / "d" / "low.txt").read_text() == "low\n"

        done = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mounts_under(mnt) == []
        assert wait_for_exit(daemons, 15) == [], "daemon still running after umount"
    finally:
        leftovers = _cleanup_mount(tmp_path, mnt)
    assert leftovers == []


# mount(8) runs its helpers without $PATH; mount.fuse's /bin/sh then searches
# its default, so `-t fuse.fuse-unionfs` finds the program only there.
HELPER_PATH_DIR = "/usr/local/bin"

# Run in a private mount namespace where HELPER_PATH_DIR holds fuse-unionfs.
MOUNT8_SCRIPT = """
set -e
mount --bind "$1" {helper_dir}
trap 'umount "$2" 2>/dev/null || true' EXIT
mount -t fuse.fuse-unionfs fuse-unionfs "$2" -o "$3"
awk -v m="$2" '$2 == m {{ print $3 }}' /proc/mounts
ls "$2"
cat "$2/a.txt"
umount "$2"
echo unmounted
"""


def test_mount_type_fuse_unionfs_through_mount8(tmp_path):
    """`mount -t fuse.fuse-unionfs fuse-unionfs MNT -o ...`, as a user types it.

    So as not to install anything on the host, the program is bind-mounted
    into mount(8)'s helper PATH inside a private mount namespace.
    """
    program = _fuse_unionfs_or_fail()
    if not shutil.which("unshare"):
        pytest.fail("unshare not found: install util-linux")
    helper_dir = tmp_path / "helper-bin"
    helper_dir.mkdir()
    (helper_dir / "fuse-unionfs").symlink_to(program)
    opts, mnt, _upper, _bottom = _layers(tmp_path)
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             MOUNT8_SCRIPT.format(helper_dir=HELPER_PATH_DIR), "sh",
             str(helper_dir), str(mnt), opts],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        fstype, *rest = done.stdout.splitlines()
        assert fstype in fstypes_of(program)
        assert rest == ["a.txt", "b.txt", "d", "a-top", "unmounted"]
        # The daemon lived in the namespace; with its mount gone it must exit.
        assert wait_for_exit(processes_mentioning(str(mnt)), 15) == []
    finally:
        _cleanup_mount(tmp_path, mnt)


def _fstype(mnt: Path) -> str:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mnt):
                return fields[2]
    return ""


# ------------------------------------------------------------ timing

@pytest.mark.slow
def test_podman_run_timing(tmp_path, capsys):
    """`podman run --rm IMAGE true` on fuse-unionfs, fuse-overlayfs and kernel overlay.

    Rounds alternate between the set-ups so that load from elsewhere on the
    machine falls on all of them alike. Reports the numbers (pytest -s);
    asserts only that every run succeeds.
    """
    programs = {"fuse-unionfs": _fuse_unionfs_or_fail(),
                "fuse-overlayfs": shutil.which("fuse-overlayfs"),
                "kernel overlay": None}
    if programs["fuse-overlayfs"] is None:
        del programs["fuse-overlayfs"]
    rootfs_tar = busybox_rootfs_tar(tmp_path, {"data/x": "x"}, _busybox_or_fail())
    rounds = int(os.environ.get("UNIONFS_PODMAN_TIMING_RUNS", "5"))
    sandboxes: dict[str, PodmanSandbox] = {}
    times: dict[str, list[float]] = {label: [] for label in programs}
    try:
        for label, program in programs.items():
            sandboxes[label] = sandbox = PodmanSandbox(program)
            sandbox.run("import", "--quiet", str(rootfs_tar), BASE_IMAGE)
            sandbox.run("run", "--rm", BASE_IMAGE, "true")   # warm caches
        for _ in range(rounds):
            for label, sandbox in sandboxes.items():
                start = time.monotonic()
                sandbox.run("run", "--rm", BASE_IMAGE, "true")
                times[label].append(time.monotonic() - start)
    finally:
        complaints = [c for sandbox in sandboxes.values() for c in sandbox.close()]
    assert not complaints, "\n".join(complaints)
    report = [f"{label:15} median {statistics.median(t):.3f}s min {min(t):.3f}s "
              f"max {max(t):.3f}s ({len(t)} runs)" for label, t in times.items()]
    with capsys.disabled():
        print("\npodman run --rm IMAGE true:\n  " + "\n  ".join(report))


# -- rootless podman with uidmapping=/gidmapping= (issue 12) ----------------------------

ROOTLESS_SCRIPT = Path(__file__).with_name("podman_rootless.py")
# An unprivileged uid and a subordinate id range for it, unlikely to be in
# use: they exist only in the test's private mount namespace.
ROOTLESS_UID = 30000 + os.getpid() % 20000
ROOTLESS_SUBID = 1_000_000 + (os.getpid() % 1000) * 65536


def _rootless_image_tar(path: Path) -> Path:
    """A static busybox rootfs whose /data has files of root and of uid 1000."""
    import io
    import tarfile
    busybox = Path(_busybox_or_fail())
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()

    def entry(name, uid=0, mode=0o644, kind=tarfile.REGTYPE, data=b"", link=""):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid
        info.size, info.linkname = len(data), link
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "dev", "proc", "sys", "data"):
            entry(d, mode=0o755, kind=tarfile.DIRTYPE)
        entry("tmp", mode=0o1777, kind=tarfile.DIRTYPE)
        entry("bin/busybox", mode=0o755, data=busybox.read_bytes())
        for applet in applets:
            if applet != "busybox":
                entry(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/:/bin/sh\n")
        entry("etc/group", data=b"root:x:0:\nuser:x:1000:\n")
        entry("data/root-file", data=b"root\n")
        entry("data/user-file", uid=1000, data=b"user\n")
        entry("data/user-dir", uid=1000, mode=0o777, kind=tarfile.DIRTYPE)
    path.chmod(0o644)
    return path


def _python_for(uid: int, source: Path) -> str | None:
    """A python that user UID can run and that imports unionfs from SOURCE
    (run from a shell, as the mount program's wrapper runs it)."""
    for python in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "--", "/bin/sh", "-c", 'exec "$@"', "sh", python, "-c",
                            f"import sys; sys.path.insert(0, {str(source)!r}); "
                            "import unionfs.cli"],
                           capture_output=True, timeout=60, cwd="/")
        if r.returncode == 0:
            return python
    return None


@pytest.mark.timeout(900)
def test_rootless_podman_with_uid_mapping():
    """An unprivileged user's podman (user namespace through newuidmap) runs
    containers on fuse-unionfs: with the storage's ids, and with --uidmap,
    for which containers/storage hands the mount program
    uidmapping=/gidmapping=. The container sees the image's owners (root
    and 1000, not the overflow id), and what it writes is stored mapped back
    (container root as the user, 1000 as the 1000th subordinate id)."""
    for tool in ("newuidmap", "newgidmap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is missing (Debian package uidmap)")
    for tool in ("unshare", "setpriv"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is missing (util-linux)")
    import unionfs
    source = Path(unionfs.__file__).resolve().parent.parent
    python = _python_for(ROOTLESS_UID, source)
    if python is None:
        pytest.skip(f"no python that uid {ROOTLESS_UID} may run imports unionfs from "
                    f"{source} (the venv's interpreter or the source is not readable by "
                    "other users)")
    base = Path(tempfile.mkdtemp(prefix="unionfs-rootless-", dir="/tmp"))
    try:
        base.chmod(0o755)
        image = _rootless_image_tar(base / "image.tar")
        r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                            str(ROOTLESS_SCRIPT), str(base), str(ROOTLESS_UID),
                            str(ROOTLESS_SUBID), python, str(source), str(image)],
                           capture_output=True, text=True, timeout=800)
        assert r.returncode == 0, r.stderr[-3000:]
        seen = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        # Daemons podman started on our behalf for this sandbox, if any are left.
        stuck = wait_for_exit(processes_mentioning(str(base)), DAEMON_EXIT_TIMEOUT)
        for pid in stuck:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)
    if "skip" in seen:
        pytest.skip(seen["skip"])
    assert "error" not in seen, seen["error"]
    assert not stuck, f"mount daemons still running after podman rm: {stuck}"
    image_view = ["0:0 /data/root-file", "1000:1000 /data/user-file", "0"]
    assert seen["plain"] == image_view
    assert seen["mapped"] == image_view
    assert any("uidmapping=" in argv and "gidmapping=" in argv
               for argv in seen["mount_program_argv"]), seen["mount_program_argv"]
    subid_1000 = ROOTLESS_SUBID + 999          # the user's userns maps 1.. to SUBID..
    assert seen["upper"] == {"root-file": [subid_1000, subid_1000],
                             "made": [subid_1000, subid_1000],
                             "user-dir/new": [ROOTLESS_UID, ROOTLESS_UID]}
