"""A throw-away podman set-up whose overlay storage mounts through a FUSE program.

`PodmanSandbox` writes its own containers.conf, storage.conf, registries.conf
and signature policy under one temporary directory and points podman at them
through the environment (podman's tmp_dir lives there too), so the host's
container configuration, images and containers are neither read nor changed.
`close()` removes every container and image, unmounts whatever is still
mounted below the directory, waits for the mount-program daemons it started
(indirectly, through podman) to exit, and deletes the directory.

Every subprocess call has a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import struct
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Environment variable naming the storage mount program the podman tests use
# (a path or a command name); unset means fuse-unionfs from this project.
MOUNT_PROGRAM_ENV = "UNIONFS_PODMAN_MOUNT_PROGRAM"

# Seconds any single podman invocation may take before the test gives up.
PODMAN_TIMEOUT = 120
# Seconds to wait for mount-program daemons to exit after their unmount.
DAEMON_EXIT_TIMEOUT = 15

# The engine settings podman needs on this kind of machine (no systemd, cgroup
# v1 without delegation, no network namespace tooling, low rlimits).
CONTAINERS_CONF = """\
[containers]
netns = "none"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp_dir}"
image_copy_tmp_dir = "{tmp_dir}"
"""

STORAGE_CONF = """\
[storage]
driver = "{driver}"
graphroot = "{graphroot}"
runroot = "{runroot}"
"""
# Without it, containers/storage mounts kernel overlayfs itself.
MOUNT_PROGRAM_CONF = """
[storage.options.overlay]
mount_program = "{mount_program}"
"""

# podman import/commit check the signature policy; the host may have none.
POLICY_JSON = '{"default": [{"type": "insecureAcceptAnything"}]}\n'

STATIC_BUSYBOX = "/bin/busybox"   # Debian busybox-static


def unionfs_program(name: str) -> str | None:
    """Path of one of this project's console scripts, preferring the running venv's."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


def selected_mount_program() -> str | None:
    """The mount program chosen by $UNIONFS_PODMAN_MOUNT_PROGRAM, default fuse-unionfs."""
    wanted = os.environ.get(MOUNT_PROGRAM_ENV, "").strip()
    if not wanted:
        return unionfs_program("fuse-unionfs")
    if os.sep in wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    return unionfs_program(wanted) or shutil.which(wanted)


def is_static_executable(path: str) -> bool:
    """True if PATH is a 64-bit little-endian ELF with no PT_INTERP (statically linked)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:6] != b"\x7fELF\x02\x01":
                return False
            phoff, = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    PT_INTERP = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != PT_INTERP
               for i in range(phnum))


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ROOT from /proc/mounts, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2:
                continue
            # /proc/mounts escapes space, tab, newline and backslash as octal.
            point = fields[1].encode().decode("unicode_escape")
            if point == prefix.rstrip("/") or point.startswith(prefix):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def processes_mentioning(text: str) -> list[int]:
    """Pids (other than ours) whose command line contains TEXT."""
    pids = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue  # exited meanwhile, or a kernel thread
    return pids


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait until the PIDS are gone; return those still alive after TIMEOUT."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and _state(p) not in ("Z", "X")]
        if alive:
            time.sleep(0.1)
    return alive


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def unmount_all_under(root: Path) -> list[str]:
    """Unmount everything mounted below ROOT; return what had to be unmounted."""
    leftovers = mounts_under(root)
    for point in leftovers:
        done = subprocess.run(["umount", point], capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    return leftovers


# ---------------------------------------------------------------- rootfs

@dataclass(frozen=True)
class Symlink:
    target: str


# A tree is {relative path: content}; content is str (a file, mode 0644),
# (str, mode) (a file with that mode), DIR (a directory, 0755) or Symlink.
DIR = object()


def write_tree(root: Path, tree: dict) -> None:
    """Create TREE below ROOT (parents implicitly, mode 0755)."""
    for rel, content in sorted(tree.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
        elif isinstance(content, Symlink):
            path.symlink_to(content.target)
        else:
            text, mode = content if isinstance(content, tuple) else (content, 0o644)
            path.write_text(text + "\n" if text else "")   # "" for whiteout files
            path.chmod(mode)


def without(tree: dict, *paths: str) -> dict:
    """TREE minus each of PATHS and everything below them."""
    return {rel: content for rel, content in tree.items()
            if not any(rel == p or rel.startswith(p + "/") for p in paths)}


def tar_tree(tar_path: Path, root: Path) -> Path:
    """Tar ROOT's contents (relative names, owned by root) into TAR_PATH."""
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(tar_path, "w") as tar:
        for entry in sorted(os.listdir(root)):
            tar.add(root / entry, arcname=entry, filter=as_root)
    return tar_path


def busybox_rootfs_tar(workdir: Path, tree: dict, busybox: str = STATIC_BUSYBOX) -> Path:
    """A rootfs tarball: static busybox in /bin with every applet linked, plus TREE."""
    rootfs = workdir / "rootfs"
    for d in ("bin", "etc", "tmp", "dev", "proc", "sys"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    write_tree(rootfs, tree)
    return tar_tree(workdir / "rootfs.tar", rootfs)


def docker_archive(workdir: Path, layer_tars: list[Path], tag: str) -> Path:
    """A `docker save`-style archive of an image made of LAYER_TARS (oldest first)."""
    archive_dir = workdir / "archive"
    archive_dir.mkdir()
    names, diff_ids = [], []
    for i, layer in enumerate(layer_tars):
        names.append(f"layer{i}.tar")
        shutil.copyfile(layer, archive_dir / names[-1])
        diff_ids.append("sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest())
    machine = platform.machine()
    goarch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    config = {"architecture": goarch, "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    (archive_dir / "config.json").write_text(json.dumps(config))
    manifest = [{"Config": "config.json", "RepoTags": [tag], "Layers": names}]
    (archive_dir / "manifest.json").write_text(json.dumps(manifest))
    return tar_tree(workdir / "image.tar", archive_dir)


def expected_listing(tree: dict, top: str) -> list[str]:
    """The lines `LISTING_SCRIPT` prints for TOP when the image holds TREE."""
    entries: dict[str, tuple[str, str]] = {}
    for rel, content in tree.items():
        if rel != top and not rel.startswith(top + "/"):
            continue
        parts = rel.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), ("D", "755"))
        if content is DIR:
            entries[rel] = ("D", "755")
        elif isinstance(content, Symlink):
            entries[rel] = ("L", content.target)
        else:
            text, mode = content if isinstance(content, tuple) else (content, 0o644)
            entries[rel] = ("F", f"{mode:o} {text}")
    return sorted(f"{kind} /{rel} {rest}" for rel, (kind, rest) in entries.items())


# Prints one line per entry below $1: "D /path mode", "F /path mode content"
# or "L /path target". Run with busybox sh inside the container.
LISTING_SCRIPT = r"""
find "$1" | sort | while IFS= read -r p; do
  if [ -L "$p" ]; then echo "L $p $(readlink "$p")"
  elif [ -d "$p" ]; then echo "D $p $(stat -c %a "$p")"
  else echo "F $p $(stat -c %a "$p") $(cat "$p")"
  fi
done
"""


# ---------------------------------------------------------------- podman

class PodmanError(AssertionError):
    pass


class PodmanSandbox:
    """podman with private config and storage in a new temp dir, mounting via MOUNT_PROGRAM.

    MOUNT_PROGRAM None means kernel overlayfs (for comparisons). DRIVER "vfs"
    makes plain copies instead (no mount program). GRAPHROOT puts the images
    and containers elsewhere (the benchmark's own filesystem); close()
    removes it too.
    """

    def __init__(self, mount_program: str | None, driver: str = "overlay",
                 graphroot: Path | None = None):
        # podman refuses a runroot longer than 50 characters, so the sandbox
        # lives directly in /tmp rather than in pytest's deep tmp_path.
        base = Path(tempfile.mkdtemp(prefix="unionfs-podman-", dir="/tmp"))
        self.base = base
        # containers/storage execs the program from its own working directory.
        self.mount_program = os.path.abspath(mount_program) if mount_program else None
        self.graphroot = graphroot or base / "graphroot"
        self.runroot = base / "runroot"
        home = base / "home"
        tmp_dir = base / "tmp"
        for d in (self.graphroot, self.runroot, home / ".config" / "containers", tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        (base / "containers.conf").write_text(CONTAINERS_CONF.format(tmp_dir=tmp_dir))
        storage_conf = STORAGE_CONF.format(driver=driver, graphroot=self.graphroot,
                                           runroot=self.runroot)
        if mount_program:
            storage_conf += MOUNT_PROGRAM_CONF.format(mount_program=self.mount_program)
        (base / "storage.conf").write_text(storage_conf)
        (base / "registries.conf").write_text("unqualified-search-registries = []\n")
        # c/image reads $HOME/.config/containers/policy.json before /etc's.
        (home / ".config" / "containers" / "policy.json").write_text(POLICY_JSON)
        self.env = dict(os.environ,
                        HOME=str(home),
                        TMPDIR=str(tmp_dir),
                        CONTAINERS_CONF=str(base / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
                        CONTAINERS_REGISTRIES_CONF=str(base / "registries.conf"))

    def run(self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT,
            ) -> subprocess.CompletedProcess:
        """Run `podman ARGS` in the sandbox; on CHECK, a non-zero exit fails the test."""
        # No --root/--runroot here: given either, podman drops the overlay
        # options of storage.conf, mount_program included, and mounts kernel
        # overlayfs. storage.conf already names graphroot and runroot.
        argv = ["podman", *args]
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise PodmanError(f"timed out after {timeout}s: {' '.join(argv)}\n"
                              f"stderr: {e.stderr}") from None
        if check and done.returncode != 0:
            raise PodmanError(f"exit {done.returncode}: {' '.join(argv)}\n"
                              f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def sh(self, image: str, script: str, *args: str, name: str | None = None) -> str:
        """Run SCRIPT with busybox sh in a new container of IMAGE; its stdout.

        With NAME the container is kept (for commit); otherwise it is removed.
        """
        keep = ["--name", name] if name else ["--rm"]
        return self.run("run", *keep, image, "/bin/sh", "-c", script, "sh", *args).stdout

    def listing(self, image: str, top: str) -> list[str]:
        """What `LISTING_SCRIPT` prints for TOP in a new container of IMAGE, sorted."""
        return sorted(self.sh(image, LISTING_SCRIPT, top).splitlines())

    def daemons(self) -> list[int]:
        """Pids of mount-program daemons serving mounts in this sandbox."""
        if not self.mount_program:
            return []
        return [pid for pid in processes_mentioning(str(self.graphroot))
                if _is_program(pid, self.mount_program)]

    def close(self) -> list[str]:
        """Remove everything; return complaints (leftover mounts or daemons)."""
        complaints = []
        for args in (("rm", "--all", "--force", "--time", "0"), ("rmi", "--all", "--force")):
            try:
                done = self.run(*args, check=False, timeout=60)
                if done.returncode != 0:
                    complaints.append(f"podman {' '.join(args)}: {done.stderr.strip()}")
            except PodmanError as e:
                complaints.append(str(e))
        leftovers = unmount_all_under(self.base) + unmount_all_under(self.graphroot)
        if leftovers:
            complaints.append(f"still mounted after podman rm/rmi: {leftovers}")
        stuck = wait_for_exit(self.daemons(), DAEMON_EXIT_TIMEOUT)
        for pid in stuck:
            # These daemons were started for this sandbox's mounts, by podman on
            # our behalf; nothing else may be killed.
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if stuck:
            complaints.append(f"mount daemons still running after unmount: {stuck}")
            wait_for_exit(stuck, 5)
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.graphroot, ignore_errors=True)
        return complaints


def _is_program(pid: int, program: str) -> bool:
    """True if process PID runs PROGRAM (directly, or as the script it interprets)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    name = os.path.basename(program).encode()
    return any(os.path.basename(a) == name for a in argv[:2])
