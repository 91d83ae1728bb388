#!/usr/bin/env python3
"""Side-by-side benchmark: native, kernel overlayfs, fuse-overlayfs, unionfs.

Every workload runs on every system in the same invocation.  Within each
repetition of a workload the systems run back to back (their order rotates
from one repetition to the next), each on a fresh mount with a fresh upper.
The table shows the median per workload and system, and the ratio
unionfs / fuse-overlayfs; the same numbers, every sample and the unionfs
daemon's peak RSS and open file descriptors go to a JSON file.

    .venv/bin/python scripts/bench.py                 # full run, several minutes
    .venv/bin/python scripts/bench.py --quick         # smoke run, under a minute
    .venv/bin/python scripts/bench.py --only find-cold,untar --systems fuse-overlayfs,unionfs
    .venv/bin/python scripts/bench.py --only untar --profile prof/   # needs py-spy

Methodology (why it is done this way):
- A timed run measures one command (dd, find, ls, tar, rm, python, dpkg, podman) started as
  a child process; mounting, unmounting and checking the result are untimed.
  Each result is checked (file counts, sizes), so a filesystem that is fast
  because it is wrong shows up as an error, not as a win.
- "cold": caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches, root only)
  and then a fresh mount.  "warm": the same command once untimed on the same
  mount first.  Everything else: fresh mount, lower layers read into the page
  cache beforehand.  `sync` runs before every timed run so no earlier dirty
  data is written back inside it.
- Uppers are never deleted between timed runs: on ext4, creating files soon
  after deleting ~10k others is slow for a while (inode allocation skips
  recently deleted inodes), which would punish whichever system runs next.
  Each run gets its own directory; all of them go at the end.  For the same
  reason the native `rm -rf` runs on a hard-linked copy (only links go away).
- Scratch space is, by default (as root), a private journaled ext4 on a loop
  device: an ext4 without a journal (like this VM's root) makes inode
  allocation slow for ~30 s after anyone deletes files, so the disk activity
  of whatever else runs on the machine would show up in our numbers.
- Lower layers are built once and never written, like the image layers they
  stand for.  The native system works on a merged copy of them.
- unionfs runs from a copy of its package taken at the start (or from a git
  revision, --unionfs-code), so edits to the work tree during a run do not
  mix versions.
- Every mount made is unmounted, also on errors and Ctrl-C.  The only
  processes ever signalled are this script's own children (and py-spy).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SYSTEMS = ("native", "overlayfs", "fuse-overlayfs", "unionfs", "unionfs-libfuse3")
# unionfs-libfuse3: unionfs on its libfuse 3 binding (UNIONFS_LIBFUSE=3), the
# one it used before it spoke /dev/fuse itself: a before/after in one run.
FUSE_SYSTEMS = ("fuse-overlayfs", "unionfs", "unionfs-libfuse3")
UNIONFS_VARIANTS = {"unionfs": {}, "unionfs-libfuse3": {"UNIONFS_LIBFUSE": "3"}}
MIB = 1 << 20

# Python-stdlib packages byte-compiled by the "compileall" workload (plus
# every top-level module in the full run).  Test suites are left out: some of
# their files are deliberately invalid Python.
STDLIB_PACKAGES_FULL = (
    "asyncio", "collections", "concurrent", "ctypes", "email", "html", "http",
    "importlib", "json", "logging", "multiprocessing", "unittest", "urllib",
    "wsgiref", "xml", "xmlrpc",
)
STDLIB_PACKAGES_QUICK = ("email", "json", "http", "urllib")


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; `--quick` shrinks all of them."""

    big_mib: int          # sequential read and copy-up file
    write_mib: int        # sequential write
    tree_dirs: int        # find/ls tree: dirs x files, spread over 3 layers
    tree_files_per_dir: int
    untar_files: int
    rm_files: int
    stdlib_packages: tuple[str, ...]
    stdlib_toplevel: bool
    image_files: int = 5_000      # chown -R tree: small files, plus big_mib // 2 in 8 MiB ones
    stat_files: int = 100_000     # stat of every path of a tree this big
    random_reads: int = 20_000    # 4 KiB reads at random offsets of the big file
    podman_files: int = 2_000     # files a container writes before podman commit/diff
    # --scale rows: one lower of huge_dirs x 101 empty files; layers_count
    # lowers of ~layer_files files each (see build_datasets)
    huge_dirs: int = 5_000
    layers_count: int = 128
    layer_files: int = 5_000


FULL = Sizes(512, 512, 200, 100, 10_000, 10_000, STDLIB_PACKAGES_FULL, True)
QUICK = Sizes(64, 64, 30, 100, 1_000, 1_000, STDLIB_PACKAGES_QUICK, False, 500, 10_000, 5_000,
              podman_files=500, huge_dirs=500, layers_count=16, layer_files=1_000)


class BenchError(Exception):
    """One run failed; the message becomes the table's footnote."""


# --------------------------------------------------------------------------
# small helpers


def run(cmd: list[str], timeout: float, capture: bool = False,
        check: bool = True, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a child; stdout is discarded unless captured, stderr kept for errors."""
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s")
    except OSError as e:
        raise BenchError(f"{cmd[0]}: {e.strerror}")
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        rc = proc.returncode
        msg = tail[-1] if tail else (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        name = Path(cmd[0]).name
        raise BenchError(msg if msg.startswith(name + ":") else f"{name}: {msg}")
    return proc


def mounted_paths() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(paths: list[Path]) -> None:
    """Pull every regular file under `paths` into the page cache."""
    buf = bytearray(MIB)
    for top in paths:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                p = os.path.join(dirpath, name)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def count_files(top: Path, suffix: str = "") -> int:
    return sum(1 for _d, _s, files in os.walk(top)
               for n in files if n.endswith(suffix))


def dd_bytes(proc: subprocess.CompletedProcess) -> int:
    """Bytes copied, from dd's closing statistics line on stderr."""
    for line in reversed(proc.stderr.decode(errors="replace").splitlines()):
        word = line.split(" ", 1)[0]
        if word.isdigit():
            return int(word)
    raise BenchError("dd printed no statistics")


# --------------------------------------------------------------------------
# lower layers (built once per run of the script, never written afterwards)


@dataclass
class Dataset:
    """A stack of lower layers (top first) and, lazily, a merged native copy."""

    name: str
    lowers: list[Path]
    expect: dict = field(default_factory=dict)
    native_copy: Path | None = None


def build_datasets(data: Path, sizes: Sizes, needed: set[str]) -> dict[str, Dataset]:
    rng = random.Random(4)
    out: dict[str, Dataset] = {}

    def layer(ds: str, i: int) -> Path:
        p = data / ds / f"l{i}"
        p.mkdir(parents=True)
        return p

    if "big" in needed:
        l0 = layer("big", 0)
        block = rng.randbytes(MIB)
        with open(l0 / "big.bin", "wb") as f:
            for i in range(sizes.big_mib):
                # vary every block a little so nothing below can dedupe it
                f.write(i.to_bytes(8, "little") + block[8:])
        out["big"] = Dataset("big", [l0], {"size": sizes.big_mib * MIB,
                                           "random_reads": sizes.random_reads})

    if "empty" in needed or "untar" in needed:
        l0 = layer("empty", 0)
        (l0 / "README").write_text("lower layer of the write and untar workloads\n")
        out["empty"] = Dataset("empty", [l0], {"size": sizes.write_mib * MIB})

    if "tree" in needed:
        # Every directory exists in all three layers (so it must be merged);
        # file j lives in layer j % 3, and every tenth file is also present,
        # shadowed, in the layer below it.
        layers = [layer("tree", i) for i in range(3)]
        payload = b"x" * 64
        for d in range(sizes.tree_dirs):
            for lp in layers:
                (lp / "tree" / f"d{d:03}").mkdir(parents=True)
            for j in range(sizes.tree_files_per_dir):
                i = j % 3
                (layers[i] / "tree" / f"d{d:03}" / f"f{j:03}").write_bytes(payload)
                if j % 10 == 0 and i < 2:
                    (layers[i + 1] / "tree" / f"d{d:03}" / f"f{j:03}").write_bytes(b"old")
        n = sizes.tree_dirs * sizes.tree_files_per_dir
        out["tree"] = Dataset("tree", layers, {"files": n, "dirs": sizes.tree_dirs + 1})

    if "many" in needed:
        # stat_files empty files in directories of 100, alternating over two
        # layers (every directory in both); the list of their paths is input.
        layers = [layer("many", i) for i in range(2)]
        ndirs = max(1, sizes.stat_files // 100)
        paths = []
        for d in range(ndirs):
            for lp in layers:
                (lp / "many" / f"d{d:04}").mkdir(parents=True)
            for j in range(100):
                rel = f"many/d{d:04}/f{j:03}"
                (layers[j % 2] / rel).touch()
                paths.append(rel)
        listing = data / "many-paths.txt"
        listing.write_text("\n".join(paths) + "\n")
        out["many"] = Dataset("many", layers, {"files": len(paths), "paths": listing})

    if "rmtree" in needed:
        layers = [layer("rmtree", i) for i in range(2)]
        ndirs = max(1, sizes.rm_files // 100)
        for d in range(ndirs):
            for lp in layers:
                (lp / "rmtree" / f"d{d:03}").mkdir(parents=True)
            for j in range(100):
                lp = layers[j % 2]
                (lp / "rmtree" / f"d{d:03}" / f"f{j:03}").write_bytes(b"y" * (j * 7))
        out["rmtree"] = Dataset("rmtree", layers)

    if "image" in needed:
        # An image-sized tree: many small files (1..32 KiB) and some large.
        l0 = layer("image", 0)
        for k in range(sizes.image_files):
            d = l0 / "image" / f"d{k // 200:03}"
            if k % 200 == 0:
                d.mkdir(parents=True)
            (d / f"f{k % 200:03}").write_bytes(rng.randbytes(rng.randint(1, 32) << 10))
        for k in range(max(1, sizes.big_mib // 2 // 8)):
            (l0 / "image" / f"big{k}").write_bytes(rng.randbytes(8 * MIB))
        out["image"] = Dataset("image", [l0], {"files": count_files(l0 / "image")})

    if "stdlib" in needed:
        l0 = layer("stdlib", 0)
        src = Path(sysconfig.get_paths()["stdlib"])
        dst = l0 / "stdlib"
        dst.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "test", "tests", "*.pyc",
                                        "idle_test")
        for pkg in sizes.stdlib_packages:
            shutil.copytree(src / pkg, dst / pkg, ignore=ignore)
        if sizes.stdlib_toplevel:
            for p in src.glob("*.py"):
                shutil.copy2(p, dst / p.name)
        out["stdlib"] = Dataset("stdlib", [l0], {"py": count_files(dst, ".py")})

    if "untar" in needed:
        # The tarball is input, not a layer: files of 100..4000 bytes in
        # directories of 100.
        src = data / "untar-src"
        for k in range(sizes.untar_files):
            d = src / "untar" / f"d{k // 100:03}"
            if k % 100 == 0:
                d.mkdir(parents=True)
            (d / f"f{k % 100:03}.txt").write_bytes(rng.randbytes(rng.randint(100, 4000)))
        tarball = data / "untar.tar"
        run(["tar", "-cf", str(tarball), "-C", str(src), "untar"], timeout=600)
        out["untar"] = Dataset("untar", out["empty"].lowers,
                               {"tarball": tarball, "files": sizes.untar_files})

    if "podman" in needed:
        out["podman"] = build_podman_dataset(data, sizes)
    if "dpkg" in needed:
        out["dpkg"] = build_dpkg_dataset(data, sizes)
    if "huge" in needed:
        out["huge"] = build_huge_dataset(data, sizes)
    if "layers" in needed:
        out["layers"] = build_layers_dataset(data, sizes)
    return out


# The --scale rows: trees of empty files (no data blocks: what grows is the
# number of entries, which is what they measure).
HUGE_FILES_PER_DIR = 101


def _touch_many(paths) -> None:
    for p in paths:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))


def build_huge_dataset(data: Path, sizes: Sizes) -> Dataset:
    """One lower of huge_dirs directories of 101 empty files each (505,000
    files at full size, the issue's shape)."""
    l0 = data / "huge" / "l0"
    for d in range(sizes.huge_dirs):
        dp = l0 / "huge" / f"d{d:04}"
        dp.mkdir(parents=True)
        _touch_many(f"{dp}/f{j:03}" for j in range(HUGE_FILES_PER_DIR))
    files = sizes.huge_dirs * HUGE_FILES_PER_DIR
    # find prints every file, every directory and the top itself
    return Dataset("huge", [l0], {"files": files, "entries": files + sizes.huge_dirs + 1})


LAYERS_SHARED_DIRS = 10     # directories every layer adds to (merged 128 ways)
LAYERS_SHARED_FILES = 10    # files per layer in each of them


def build_layers_dataset(data: Path, sizes: Sizes) -> Dataset:
    """layers_count lowers, as an image with many layers: each adds
    LAYERS_SHARED_FILES files to every one of LAYERS_SHARED_DIRS directories
    that all layers share (and rewrites one file there, shadowing the copy
    in every layer below), and the rest of its ~layer_files files in a
    subtree of its own, 100 files per directory."""
    layers = []
    own = max(0, sizes.layer_files - LAYERS_SHARED_DIRS * (LAYERS_SHARED_FILES + 1))
    for i in range(sizes.layers_count):
        lp = data / "layers" / f"l{i:03}"
        for s in range(LAYERS_SHARED_DIRS):
            dp = lp / "layers" / "shared" / f"s{s:02}"
            dp.mkdir(parents=True)
            _touch_many([f"{dp}/common"] +
                        [f"{dp}/l{i:03}-{j:02}" for j in range(LAYERS_SHARED_FILES)])
        for k in range(0, own, 100):
            dp = lp / "layers" / f"own{i:03}" / f"d{k // 100:02}"
            dp.mkdir(parents=True)
            _touch_many(f"{dp}/f{j:02}" for j in range(min(100, own - k)))
        layers.append(lp)
    layers.reverse()        # top first: the last built is the top layer
    n = sizes.layers_count
    files = LAYERS_SHARED_DIRS * (n * LAYERS_SHARED_FILES + 1) + n * own
    dirs = 1 + 1 + LAYERS_SHARED_DIRS + n * (1 + -(-own // 100))
    return Dataset("layers", layers, {"files": files, "entries": files + dirs})


# The dpkg workload's packages: what `apt-get install` of a few packages does
# to a Debian rootfs, without a network at bench time. One .deb per stdlib
# package of the run, its files under DPKG_PREFIX, and a postinst that writes
# to the rootfs's own /dev/null, as maintainer scripts do.
DPKG_PREFIX = "usr/lib/bench-python"
DPKG_POSTINST = "#!/bin/sh\nset -e\necho configured > /dev/null\n"
DPKG_ADMINDIR = "var/lib/dpkg"


def build_dpkg_dataset(data: Path, sizes: Sizes) -> Dataset:
    """A Debian-like lower layer and the .debs to install into it.

    The layer: static busybox as /bin/sh (dpkg runs maintainer scripts in a
    chroot of the rootfs), a /dev/null device node, and a copy of this host's
    dpkg database, so dpkg reads a real one (thousands of file lists) before
    unpacking, as on a Debian system. Needs root (mknod) and a Debian host.
    """
    missing = [p for p in ("dpkg", "dpkg-deb") if not shutil.which(p)]
    if missing or os.geteuid() != 0 or not Path("/bin/busybox").is_file() \
            or not Path("/", DPKG_ADMINDIR, "status").is_file():
        l0 = data / "dpkg" / "l0"
        l0.mkdir(parents=True)
        return Dataset("dpkg", [l0], {"unavailable": "needs root, dpkg, dpkg-deb, busybox-static "
                                                     "and a dpkg database on the host"})
    l0 = data / "dpkg" / "l0"
    for d in ("bin", "dev", "tmp", "etc", "var/lib"):
        (l0 / d).mkdir(parents=True, exist_ok=True)
    (l0 / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", l0 / "bin" / "busybox")
    (l0 / "bin" / "sh").symlink_to("busybox")
    os.mknod(l0 / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    run(["cp", "-a", "/" + DPKG_ADMINDIR, str(l0 / "var" / "lib")], timeout=600)
    for lock in ("lock", "lock-frontend", "triggers/Lock"):
        (l0 / DPKG_ADMINDIR / lock).unlink(missing_ok=True)

    src = Path(sysconfig.get_paths()["stdlib"])
    ignore = shutil.ignore_patterns("__pycache__", "test", "tests", "*.pyc", "idle_test")
    debs, files = [], 0
    for pkg in sizes.stdlib_packages:
        name = f"bench-python-{pkg}"
        root = data / "dpkg-src" / name
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
            "Maintainer: unionfs bench <bench@example.invalid>\n"
            f"Description: Python's {pkg} package, for the dpkg benchmark\n")
        (root / "DEBIAN" / "postinst").write_text(DPKG_POSTINST)
        (root / "DEBIAN" / "postinst").chmod(0o755)
        shutil.copytree(src / pkg, root / DPKG_PREFIX / pkg, ignore=ignore)
        files += count_files(root / DPKG_PREFIX)
        debs.append(data / f"{name}.deb")
        run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(debs[-1])], timeout=600)
    return Dataset("dpkg", [l0], {"debs": debs, "files": files,
                                  "packages": [f"bench-python-{p}" for p in sizes.stdlib_packages]})


def _dpkg_install(root, ds):
    if "unavailable" in ds.expect:
        raise BenchError(ds.expect["unavailable"])
    return ["dpkg", f"--root={root}", "--force-depends", "-i", *map(str, ds.expect["debs"])]


def _check_dpkg(root, ds, proc):
    status = (root / DPKG_ADMINDIR / "status").read_text()
    installed = [p for p in ds.expect["packages"]
                 if f"Package: {p}\nStatus: install ok installed\n" in status]
    _expect("packages installed", installed, ds.expect["packages"])
    _expect("files unpacked", count_files(root / DPKG_PREFIX), ds.expect["files"])


def merged_copy(ds: Dataset, dest: Path, link: bool, timeout: float) -> None:
    """What the union shows, as a plain directory: layers copied bottom up."""
    dest.mkdir(parents=True)
    for lower in reversed(ds.lowers):
        run(["cp", "-al" if link else "-a", f"{lower}/.", str(dest)], timeout)


# --------------------------------------------------------------------------
# systems

REPO = Path(__file__).resolve().parent.parent


def snapshot_code(which: str, dest: Path) -> Path | None:
    """Copy the unionfs package to `dest` so the whole run measures one
    version of it, even while the working tree is being edited.

    which: "worktree" (as it is now), "installed" (no copy: whatever the
    unionfs command imports) or a git revision such as HEAD.
    """
    if which == "installed" or not (REPO / "unionfs").is_dir():
        return None
    dest.mkdir(parents=True)
    if which == "worktree":
        shutil.copytree(REPO / "unionfs", dest / "unionfs",
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", which, "unionfs"],
                                 capture_output=True)
        if archive.returncode != 0:
            msg = archive.stderr.decode(errors="replace").strip().splitlines()
            raise BenchError(f"git archive {which}: {msg[-1] if msg else 'failed'}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    # Byte-compiled, as pip installs it: without, every unionfs command of the
    # run compiles what it imports (~30 ms of CPU a mount), and does so
    # each time where PYTHONDONTWRITEBYTECODE is set.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "unionfs")],
                   check=True, stdout=subprocess.DEVNULL)
    return dest


OPTIONS_PAGE = 4096     # mount(2) copies at most one page of option text


class Mounts:
    """Mounts and unmounts the systems under test; remembers what is live."""

    def __init__(self, timeout: float, unionfs_options: str, code: Path | None):
        self.timeout = timeout
        self.unionfs_options = unionfs_options
        self.live: list[tuple[str, Path]] = []
        self.unionfs_cmd = self._find_unionfs()
        # With a snapshot of the package, the unionfs command imports it
        # instead of the (editable, possibly half-edited) installed one.
        # PYTHONSAFEPATH: `python -m` would otherwise put the current
        # directory (often the work tree) ahead of PYTHONPATH.
        self.unionfs_env = None
        if code is not None:
            self.unionfs_env = dict(os.environ, PYTHONPATH=str(code), PYTHONSAFEPATH="1")

    def libfuse_version(self) -> str | None:
        """The binding the unionfs under test uses: its libfuse ("libfuse
        3.14.0", "libfuse 2.9") or its own /dev/fuse binding ("/dev/fuse")."""
        cmd = [sys.executable, "-c",
               "from unionfs import binding; b = binding.load(); "
               "print('libfuse ' + b.library_version() if hasattr(b, 'library_version') "
               "else '/dev/fuse')"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                 env=self.unionfs_env)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None     # an old revision: no binding module

    def env_for(self, system: str) -> dict | None:
        """The environment of `system`'s mount command (None: ours)."""
        if system not in UNIONFS_VARIANTS:
            return None
        extra = UNIONFS_VARIANTS[system]
        if not extra:
            return self.unionfs_env
        return dict(self.unionfs_env or os.environ, **extra)

    @staticmethod
    def _find_unionfs() -> list[str]:
        # Next to the interpreter (the venv's bin/) when installed, else the
        # package itself.  sys.executable is deliberately not resolved: the
        # venv's python is a symlink to the system one.
        exe = Path(sys.executable).parent / "unionfs"
        if exe.exists():
            return [str(exe)]
        return [sys.executable, "-m", "unionfs"]

    def unavailable(self, system: str) -> str | None:
        """Why `system` cannot run here, or None."""
        if system == "native":
            return None
        if system == "overlayfs":
            if os.geteuid() != 0:
                return "kernel overlayfs needs root"
            with open("/proc/filesystems") as f:
                if "overlay" not in f.read().split():
                    return "kernel has no overlay filesystem"
            return None
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if system == "fuse-overlayfs":
            return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"
        if system in UNIONFS_VARIANTS:
            probe = subprocess.run(self.unionfs_cmd + ["--help"], capture_output=True,
                                   env=self.env_for(system))
            if probe.returncode != 0 or b"mount" not in probe.stdout:
                tail = probe.stderr.decode(errors="replace").strip().splitlines()
                return "unionfs command not usable: " + (tail[-1] if tail else "no mount subcommand")
            return None
        return f"unknown system {system}"

    def mount(self, system: str, lowers: list[Path], upper: Path, work: Path,
              mnt: Path, extra: str = "") -> None:
        for p in (upper, work, mnt):
            p.mkdir(parents=True)
        opts = (f"lowerdir={':'.join(map(str, lowers))},"
                f"upperdir={upper},workdir={work}")
        if extra:
            opts += "," + extra
        cwd = None
        if system == "overlayfs":
            if len(opts) >= OPTIONS_PAGE:
                # mount(2) takes one page of options: name 128 lowers
                # relative to their common parent, where mount runs.
                cwd = Path(os.path.commonpath(lowers))
                opts = opts.replace(f"{cwd}/", "")
            cmd = ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]
        elif system == "fuse-overlayfs":
            # dev: device nodes open as on overlayfs and unionfs mounted by root
            # (fuse-overlayfs's default is nodev); dpkg's postinst writes the
            # rootfs's /dev/null, no other workload opens a device.
            cmd = ["fuse-overlayfs", "-o", opts + ",dev", str(mnt)]
        elif system in UNIONFS_VARIANTS:
            if self.unionfs_options:
                opts += "," + self.unionfs_options
            cmd = self.unionfs_cmd + ["mount", "-o", opts, str(mnt)]
        else:
            raise ValueError(system)
        # Recorded before mounting: if the command dies half way, cleanup
        # still looks at this mountpoint.
        self.live.append((system, mnt))
        run(cmd, self.timeout, env=self.env_for(system), cwd=cwd)
        if str(mnt) not in mounted_paths():
            raise BenchError(f"{system}: mount returned but {mnt} is not mounted")

    def umount(self, system: str, mnt: Path) -> None:
        try:
            if str(mnt) not in mounted_paths():
                return
            if system == "overlayfs":
                cmd = ["umount", str(mnt)]
            elif system == "fuse-overlayfs":
                cmd = ["fusermount3", "-u", str(mnt)]
            else:
                cmd = self.unionfs_cmd + ["umount", str(mnt)]
            try:
                run(cmd, self.timeout, env=self.env_for(system))
            except BenchError as e:
                # Busy or hung: detach it so nothing is left behind; a FUSE
                # daemon exits once the kernel lets go of the connection.
                print(f"bench: unmount {mnt} failed ({e}); detaching it",
                      file=sys.stderr)
                run(["umount", "-l", str(mnt)], 60, check=False)
                raise
            # fusermount -u returns before a daemon has quite exited; the
            # next run must not compete with it.
            deadline = time.monotonic() + 10
            while str(mnt) in mounted_paths() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            if (system, mnt) in self.live:
                self.live.remove((system, mnt))

    def umount_all(self) -> None:
        for system, mnt in reversed(list(self.live)):
            try:
                self.umount(system, mnt)
            except BenchError as e:
                print(f"bench: {e}", file=sys.stderr)


def daemon_pid(mnt: Path) -> int | None:
    """The FUSE daemon serving `mnt`: a process with the mountpoint among its
    arguments and /dev/fuse open.  (No fuser here; daemons daemonise, so the
    pid of the command that mounted is not the daemon's.)"""
    target = str(mnt).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if not any(a == target or a.endswith(b"=" + target) for a in args):
                continue
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse" for fd in fds):
                return int(entry)
        except OSError:
            continue
    return None


O_PATH = 0o10000000


def daemon_stats(pid: int) -> dict:
    """Peak and current RSS (KiB), the number of open fds of `pid` (O_PATH
    ones apart) and its CPU time."""
    stats = {"pid": pid}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                stats[key] = int(value.split()[0])
    # Open fds, not counting O_PATH ones: unionfs keeps a bounded cache of
    # O_PATH directory handles (layers.DIRFD_BUDGET), which is not a leak.
    fds = dirfds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(l.split()[1], 8) for l in f if l.startswith("flags:"))
        except (OSError, StopIteration):
            continue        # closed meanwhile
        if flags & O_PATH:
            dirfds += 1
        else:
            fds += 1
    stats["fds"], stats["path_fds"] = fds, dirfds
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime + stime (fields 14 and 15 of the whole line), in clock ticks
    stats["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return stats


class LoopFs:
    """A private ext4 (with a journal) on a loop device, as scratch space.

    Why: on an ext4 without a journal, creating inodes soon after others were
    deleted (by anyone, e.g. a test suite running next to us, or the previous
    system's rm -rf cleaning up its whiteouts) is slow for ~30 s, which turns
    create-heavy rows into noise.  A journaled ext4 of our own is isolated from
    the rest of the machine; direct I/O on the loop device keeps its data out
    of the host page cache, so dropping caches still makes reads cold.
    """

    def __init__(self, work: Path, timeout: float):
        self.image = work / "fs.img"
        self.mnt = work / "fs"
        self.timeout = timeout
        self.dev: str | None = None
        self.mounted = False

    @staticmethod
    def possible() -> bool:
        return (os.geteuid() == 0 and os.path.exists("/dev/loop-control")
                and all(shutil.which(t) for t in ("losetup", "mkfs.ext4")))

    def create(self, gib: int, inodes: int | None = None) -> Path:
        """``inodes``: at least this many (else mkfs's default, one per 16 KiB)."""
        if os.geteuid() != 0:
            raise BenchError("--loop-ext4 needs root")
        with open(self.image, "wb") as f:
            f.truncate(gib << 30)
        # Initialise inode tables and journal now, not in the background
        # while we measure.
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             *(["-N", str(inodes)] if inodes else []), str(self.image)], self.timeout)
        self.dev = run(["losetup", "--find", "--show", "--direct-io=on", str(self.image)],
                       self.timeout, capture=True).stdout.decode().strip()
        self.mnt.mkdir()
        run(["mount", self.dev, str(self.mnt)], self.timeout)
        self.mounted = True
        return self.mnt

    def destroy(self, keep_image: bool = False) -> None:
        if self.mounted:
            try:
                run(["umount", str(self.mnt)], self.timeout)
            except BenchError as e:
                print(f"bench: {e}; detaching {self.mnt}", file=sys.stderr)
                run(["umount", "-l", str(self.mnt)], 60, check=False)
            self.mounted = False
        if self.dev:
            run(["losetup", "-d", self.dev], 60, check=False)
            self.dev = None
        if not keep_image:
            self.image.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Workload:
    """One timed command.

    cache: "cold", "warm" or "fresh" (see the module docstring).
    native: how the native system gets its directory: "shared" (one merged
      copy, read-only use), "copy" (a fresh merged copy per run), "link" (a
      fresh hard-linked copy per run) or "none" (native does not take part).
    command(root, ds) -> argv; check(root, ds, proc) raises BenchError when
    the result is wrong.  goal: issue 17's ratio target for unionfs /
    fuse-overlayfs (None: not held to one); kernel_goal: its target for
    unionfs / kernel overlayfs (the data paths: near the physical limit;
    copy-up, which both make durable, is held to kernel overlayfs alone).
    """

    name: str
    about: str
    dataset: str
    cache: str
    native: str
    command: Callable[[Path, Dataset], list[str]]
    check: Callable[[Path, Dataset, subprocess.CompletedProcess], None]
    goal: float | None = 1.0
    kernel_goal: float | None = None
    capture: bool = False
    # Extra mount options per system (metacopy for chown-R).
    options: dict = field(default_factory=dict)
    # Untimed, after mounting: prepare(root, ds) -> argv (None: nothing).
    prepare: Callable[[Path, Dataset], list[str]] | None = None
    # A podman row (see "podman rows"): this prepares its private podman
    # untimed, and command/check get that PodmanRun in place of `root`.
    podman: Callable[["PodmanRun", Dataset], None] | None = None
    # Long (hundreds of thousands of files): run with --scale or --only.
    scale: bool = False


def _goal_cell(wl: Workload, to_fuse, to_kernel, missed: list) -> str:
    """The goal column: each target of ``wl`` (to fuse-overlayfs, to
    kernel overlayfs), met or MISSED; a missed row is added to ``missed``."""
    parts = []
    ok = True
    for goal, r, peer in ((wl.goal, to_fuse, ""), (wl.kernel_goal, to_kernel, " overlayfs")):
        if goal is None:
            continue
        if r is None:           # the peer did not run: nothing to hold it to
            parts.append(f"≤ {goal:.1f}{peer} -")
            continue
        met = r <= goal
        ok = ok and met
        parts.append(f"≤ {goal:.1f}{peer} " + ("met" if met else "MISSED"))
    if not ok:
        missed.append(wl.name)
    return "; ".join(parts) or "(info)"


def _expect(what: str, got, want) -> None:
    if got != want:
        raise BenchError(f"wrong result: {what} is {got}, expected {want}")


def _check_read(root, ds, proc):
    _expect("bytes read", dd_bytes(proc), ds.expect["size"])


def _check_write(root, ds, proc):
    _expect("size written", (root / "out.bin").stat().st_size, ds.expect["size"])


def _check_append(root, ds, proc):
    _expect("size after append", (root / "big.bin").stat().st_size,
            ds.expect["size"] + 4096)
    _expect("lower size after append", (ds.lowers[0] / "big.bin").stat().st_size,
            ds.expect["size"])


def _check_find(root, ds, proc):
    _expect("files found", proc.stdout.count(b"\n"), ds.expect["files"])


def _check_ls(root, ds, proc):
    lines = proc.stdout.splitlines()
    _expect("files listed", sum(1 for ln in lines if ln.startswith(b"-")),
            ds.expect["files"])


def _check_untar(root, ds, proc):
    _expect("files extracted", count_files(root / "untar"), ds.expect["files"])


def _check_rm(root, ds, proc):
    _expect("tree still there", (root / "rmtree").exists(), False)


def _check_compile(root, ds, proc):
    _expect(".pyc files", count_files(root / "stdlib", ".pyc"), ds.expect["py"])


def _check_chown(root, ds, proc):
    owned = sum(1 for dirpath, _, names in os.walk(root / "image") for n in names
                if os.lstat(os.path.join(dirpath, n)).st_uid == 4321)
    _expect("files chowned", owned, ds.expect["files"])


def _check_mount(root, ds, proc):
    _expect("top-level dirs", sorted(os.listdir(root)), ["tree"])


def _dd_read(root, ds):
    return ["dd", f"if={root}/big.bin", "of=/dev/null", "bs=1M"]


# Small programs the timed runs execute (python, so each is one process).
_RANDOM_READ = """
import os, random, sys
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // 4096
rng = random.Random(7)
total = 0
for _ in range(n):
    total += len(os.pread(fd, 4096, rng.randrange(blocks) * 4096))
print(total)
"""
_STAT_ALL = """
import os, sys
root = sys.argv[1]
n = 0
with open(sys.argv[2]) as f:
    for line in f:
        os.lstat(root + "/" + line.rstrip("\\n"))
        n += 1
print(n)
"""


def _check_random(root, ds, proc):
    _expect("bytes read", int(proc.stdout.split()[0]), 4096 * ds.expect["random_reads"])


def _check_stat(root, ds, proc):
    _expect("paths stat'ed", int(proc.stdout.split()[0]), ds.expect["files"])


def _find(root, ds):
    return ["find", str(root / "tree"), "-type", "f", "-printf", "%s %m %T@\n"]


def _find_all(top):
    """The issue's scale measurement: every entry's size."""
    return lambda root, ds: ["find", str(root / top), "-printf", "%s\n"]


def _check_find_all(root, ds, proc):
    _expect("entries found", proc.stdout.count(b"\n"), ds.expect["entries"])


WORKLOADS: list[Workload] = [
    Workload("mount", "mount over 3 layers of the find tree, caches dropped "
             "(native: nothing to mount)", "tree", "cold", "none",
             lambda root, ds: ["true"], _check_mount),
    Workload("read-cold", "sequential read of a large lower file, caches dropped",
             "big", "cold", "shared", _dd_read, _check_read, kernel_goal=1.3),
    Workload("read-warm", "the same read again on the same mount",
             "big", "warm", "shared", _dd_read, _check_read, kernel_goal=1.3),
    Workload("write", "sequential write, 1 MiB blocks, fsync (dd conv=fsync)",
             "empty", "fresh", "copy",
             lambda root, ds: ["dd", "if=/dev/zero", f"of={root}/out.bin", "bs=1M",
                               f"count={ds.expect['size'] // MIB}", "conv=fsync"],
             _check_write, kernel_goal=1.3),
    Workload("copy-up", "first 4 KiB append to a large lower file (copy-up)",
             "big", "fresh", "copy",
             lambda root, ds: ["dd", "if=/dev/zero", f"of={root}/big.bin", "bs=4096",
                               "count=1", "oflag=append", "conv=notrunc"],
             _check_append, goal=None, kernel_goal=1.0),
    Workload("reread", "read of a file just written through the mount "
             "(written untimed with dd conv=fsync)", "empty", "fresh", "copy",
             lambda root, ds: ["dd", f"if={root}/out.bin", "of=/dev/null", "bs=1M"],
             _check_read, kernel_goal=1.3,
             prepare=lambda root, ds: ["dd", "if=/dev/zero", f"of={root}/out.bin", "bs=1M",
                                       f"count={ds.expect['size'] // MIB}", "conv=fsync"]),
    Workload("read-random", "random 4 KiB reads of the large lower file (lowers cached)",
             "big", "fresh", "shared",
             lambda root, ds: [sys.executable, "-c", _RANDOM_READ, f"{root}/big.bin",
                               str(ds.expect["random_reads"])],
             _check_random, kernel_goal=1.3, capture=True),
    Workload("find-cold", "find + stat of every file over 3 layers, caches dropped",
             "tree", "cold", "shared", _find, _check_find, capture=True),
    Workload("find-warm", "the same find again on the same mount",
             "tree", "warm", "shared", _find, _check_find, capture=True),
    Workload("ls-lR", "ls -lR of the same tree on a fresh mount",
             "tree", "fresh", "shared",
             lambda root, ds: ["ls", "-lR", str(root / "tree")], _check_ls, capture=True),
    Workload("ls-lR-warm", "the same ls -lR again on the same mount",
             "tree", "warm", "shared",
             lambda root, ds: ["ls", "-lR", str(root / "tree")], _check_ls, capture=True),
    Workload("stat-100k", "lstat of every path of a 100k-file tree over 2 layers "
             "(fresh mount)", "many", "fresh", "shared",
             lambda root, ds: [sys.executable, "-c", _STAT_ALL, str(root),
                               str(ds.expect["paths"])],
             _check_stat, capture=True),
    Workload("untar", "tar -x of small files (100 B..4 KiB) into the mount",
             "untar", "fresh", "copy",
             lambda root, ds: ["tar", "-xf", str(ds.expect["tarball"]), "-C", str(root)],
             _check_untar),
    Workload("compileall", "python -m compileall -q on a stdlib copy in a lower layer",
             "stdlib", "fresh", "copy",
             lambda root, ds: [sys.executable, "-m", "compileall", "-q",
                               str(root / "stdlib")],
             _check_compile),
    Workload("dpkg", "dpkg -i of local .debs (Python stdlib packages, a postinst "
             "writing /dev/null) into a Debian-like rootfs with a real dpkg database",
             "dpkg", "fresh", "copy", _dpkg_install, _check_dpkg),
    Workload("chown-R", "chown -R of an image-sized lower tree (overlayfs and unionfs "
             "with metacopy=on: metadata-only copy-up; fuse-overlayfs has none)",
             "image", "fresh", "copy",
             lambda root, ds: ["chown", "-R", "4321:4321", str(root / "image")],
             _check_chown,
             options={"overlayfs": "metacopy=on,redirect_dir=on", "unionfs": "metacopy=on"}),
    # --scale only (long): how cost and the daemon's memory grow with the tree.
    Workload("find-500k", "find -printf '%s\\n' of one lower of 505,000 files in "
             "5,000 directories, caches dropped", "huge", "cold", "shared",
             _find_all("huge"), _check_find_all, goal=1.0, capture=True, scale=True),
    Workload("find-128-layers", "find -printf '%s\\n' over 128 lowers of ~5,000 "
             "files each, caches dropped", "layers", "cold", "shared",
             _find_all("layers"), _check_find_all, goal=1.0, capture=True, scale=True),
    Workload("ls-lR-128-layers", "ls -lR of the same 128 lowers on a fresh mount",
             "layers", "fresh", "shared",
             lambda root, ds: ["ls", "-lR", str(root / "layers")], _check_ls, goal=1.0,
             capture=True, scale=True),
    # Last on purpose: the native run deletes (hard links), see the docstring.
    Workload("rm-rf", "rm -rf of a tree spread over 2 lower layers",
             "rmtree", "fresh", "link",
             lambda root, ds: ["rm", "-rf", str(root / "rmtree")], _check_rm),
]

# --------------------------------------------------------------------------
# podman rows: the real use. podman's overlay storage with fuse-unionfs as its
# mount_program, against the same with fuse-overlayfs, podman's own kernel
# overlay driver and its vfs driver (a plain copy per container), in the
# table's columns: native = vfs, overlayfs = kernel overlay driver,
# fuse-overlayfs / unionfs / unionfs-libfuse3 = that mount_program.
#
# Every timed run gets a fresh private podman (tests/podman_helpers.py's
# PodmanSandbox: its own containers.conf, storage.conf and signature policy,
# no network namespace; the graphroot on the bench's scratch fs), so the
# host's podman storage is never read or written. The base image is a
# static busybox rootfs made here and `podman import`ed (no network, no
# registry); the row's preparation is untimed; the run ends with every
# container and image removed, every mount gone and the mount programs'
# daemons exited.

PODMAN_BASE = "localhost/unionfs-bench/base:1"
PODMAN_BUILT = "localhost/unionfs-bench/built:1"
PODMAN_COMMITTED = "localhost/unionfs-bench/committed:1"
PODMAN_CONTAINER = "bench"    # names are per private podman, so no clash
# storage driver and mount program of each system
PODMAN_STORAGE = {"native": ("vfs", None), "overlayfs": ("overlay", None),
                  "fuse-overlayfs": ("overlay", "fuse-overlayfs"),
                  "unionfs": ("overlay", "fuse-unionfs"),
                  "unionfs-libfuse3": ("overlay", "fuse-unionfs")}
# Environment the bench sets for unionfs (code snapshot, binding) that the
# mount program must see: podman passes its own environment on to it.
PODMAN_PASSED_ENV = ("PYTHONPATH", "PYTHONSAFEPATH", "UNIONFS_LIBFUSE")
PODMAN_BASE_TREE = {"data/base/keep.txt": "keep", "data/base/modify.txt": "old",
                    "data/base/delete.txt": "gone"}
# podman build: 3 RUN steps, each a container on the previous step's layer.
PODMAN_BUILD_FILES = 300
CONTAINERFILE = f"""\
FROM {PODMAN_BASE}
RUN mkdir /built && i=0 && while [ $i -lt {PODMAN_BUILD_FILES} ]; do echo $i > /built/f$i; i=$((i + 1)); done
RUN cp -a /bin /built/bin && dd if=/dev/zero of=/built/blob bs=1M count=8 2>/dev/null
RUN rm -r /built/bin && tar -cf /built.tar /built 2>/dev/null
"""
# What the container of podman-commit and podman-diff changes first: $1 new
# files in directories of 100, a new file of $2 MiB, one lower file
# modified and one deleted.
PODMAN_CHANGES = r"""set -e
n=$1; i=0
while [ $i -lt $n ]; do
  d=/data/new/d$((i / 100)); [ -d $d ] || mkdir -p $d
  echo "file $i" > $d/f$i; i=$((i + 1))
done
dd if=/dev/zero of=/data/new/big.bin bs=1M count=$2 2>/dev/null
echo new > /data/base/modify.txt
rm /data/base/delete.txt
"""


def _podman_helpers():
    """tests/podman_helpers.py: the one place that knows how to keep podman
    away from the host's configuration and storage."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import podman_helpers
    return podman_helpers


def build_podman_dataset(data: Path, sizes: Sizes) -> Dataset:
    missing = [p for p in ("podman", "runc") if not shutil.which(p)]
    if missing or os.geteuid() != 0:
        return Dataset("podman", [], {"unavailable": "needs root, podman and runc"})
    ph = _podman_helpers()
    if not ph.is_static_executable(ph.STATIC_BUSYBOX):
        return Dataset("podman", [], {"unavailable": "needs busybox-static"})
    tarball = ph.busybox_rootfs_tar(data / "podman", PODMAN_BASE_TREE)
    context = data / "podman-build"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE)
    return Dataset("podman", [], {"rootfs_tar": tarball, "context": context,
                                  "files": sizes.podman_files,
                                  "big_mib": max(1, sizes.big_mib // 8),
                                  "size": sizes.write_mib * MIB})


class PodmanRun:
    """One timed run's private podman: storage driver and mount program of
    the system, the bench's environment for unionfs passed on to it."""

    def __init__(self, system: str, graphroot: Path, env: dict | None, timeout: float):
        self.timeout = timeout
        driver, program = PODMAN_STORAGE[system]
        path = None
        if program == "fuse-unionfs":
            path = _podman_helpers().unionfs_program(program)
        elif program:
            path = shutil.which(program)
        if program and not path:
            raise BenchError(f"{program} not found")
        self.mount_program = path
        self.sandbox = _podman_helpers().PodmanSandbox(path, driver=driver,
                                                       graphroot=graphroot)
        for key in PODMAN_PASSED_ENV:
            if env and key in env:
                self.sandbox.env[key] = env[key]
        self.pid: int | None = None         # the container's first process
        self.merged: Path | None = None     # its rootfs mount (overlay driver)

    @property
    def env(self) -> dict:
        return self.sandbox.env

    def podman(self, *args: str) -> subprocess.CompletedProcess:
        return run(["podman", *args], self.timeout, capture=True, env=self.env)

    def start_container(self) -> None:
        """Start PODMAN_CONTAINER (idle) and check its rootfs is what the
        system says: a FUSE mount served by the mount program, or not."""
        self.podman("run", "-d", "--name", PODMAN_CONTAINER, PODMAN_BASE, "sleep", "1000000")
        out = self.podman("inspect", "--format",
                          "{{.State.Pid}} {{.GraphDriver.Data.MergedDir}}",
                          PODMAN_CONTAINER).stdout.decode().split()
        self.pid = int(out[0])
        if len(out) > 1 and out[1].startswith("/"):
            self.merged = Path(out[1])
        with open(f"/proc/{self.pid}/mounts") as f:
            root_type = next(line.split()[2] for line in f if line.split()[1] == "/")
        if self.mount_program and not root_type.startswith("fuse"):
            raise BenchError(f"container rootfs is {root_type}, not {self.mount_program}")
        if not self.mount_program and root_type.startswith("fuse"):
            raise BenchError(f"container rootfs is {root_type}, expected no FUSE")

    def exec_sh(self, script: str, *args: str) -> str:
        return self.podman("exec", PODMAN_CONTAINER, "/bin/sh", "-c", script,
                           "sh", *args).stdout.decode()

    def close(self) -> None:
        complaints = self.sandbox.close()
        if complaints:
            raise BenchError("podman clean-up: " + complaints[0].splitlines()[0])


class DaemonReaper:
    """CPU time and peak RSS of the mount-program daemons podman starts.

    containers/storage runs the mount program for every mount; the daemon
    forks away from podman and lives as long as the mount. For the podman
    rows this process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so
    those daemons become our children: when one exits, wait4() hands us its
    own CPU time and peak RSS, even for the short-lived ones of a build's
    steps or a `run --rm` that the mount-based lookup (daemon_pid) cannot
    see. A zombie's /proc/PID/stat still names its program; other orphans
    (conmon) are reaped and not counted.
    """

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self, program: str | None):
        # a forked daemon keeps the command name of the program podman ran
        self.comm = Path(program).name[:15] if program else None

    def set_subreaper(self, on: bool) -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(self.PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            raise BenchError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")

    def live(self, exclude: int | None = None) -> list[int]:
        """Our children that run the mount program and have not exited."""
        found = []
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == exclude:
                continue
            state, ppid, comm = _proc_stat(int(entry))
            if ppid == me and comm == self.comm and state not in ("Z", "X"):
                found.append(int(entry))
        return found

    def reap(self) -> tuple[int, float, int]:
        """Collect every exited orphan; returns (daemons, their CPU seconds,
        their largest peak RSS in KiB)."""
        n, cpu, rss = 0, 0.0, 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            _state, _ppid, comm = _proc_stat(info.si_pid)
            _pid, _status, usage = os.wait4(info.si_pid, 0)
            if self.comm and comm == self.comm:
                n += 1
                cpu += usage.ru_utime + usage.ru_stime
                rss = max(rss, usage.ru_maxrss)
        return n, cpu, rss


def _proc_stat(pid: int) -> tuple[str, int, str]:
    """(state, parent pid, command name) of `pid`; ("X", 0, "") once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return "X", 0, ""
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), comm


def _podman_write_big(pr: PodmanRun, ds: Dataset) -> None:
    pr.start_container()
    pr.exec_sh(f"dd if=/dev/zero of=/big.bin bs=1M count={ds.expect['size'] // MIB} "
               "conv=fsync 2>/dev/null")


def _podman_change(pr: PodmanRun, ds: Dataset) -> None:
    pr.start_container()
    pr.exec_sh(PODMAN_CHANGES, str(ds.expect["files"]), str(ds.expect["big_mib"]))


def _check_podman_build(pr, ds, proc):
    out = pr.podman("run", "--rm", PODMAN_BUILT, "/bin/sh", "-c",
                    "ls /built | wc -l; tar -tf /built.tar 2>/dev/null | wc -l; "
                    "test -e /built/bin && echo bin-left || echo bin-gone")
    # f0.. and blob; in the tar also the directory itself
    want = [str(PODMAN_BUILD_FILES + 1), str(PODMAN_BUILD_FILES + 2), "bin-gone"]
    _expect("built image's /built", out.stdout.decode().split(), want)


def _check_podman_run(pr, ds, proc):
    _expect("containers left", pr.podman("ps", "-aq").stdout.decode().split(), [])


def _check_podman_commit(pr, ds, proc):
    out = pr.podman("run", "--rm", PODMAN_COMMITTED, "/bin/sh", "-c",
                    "find /data/new -type f | wc -l; cat /data/base/modify.txt; "
                    "test -e /data/base/delete.txt && echo kept || echo deleted")
    _expect("committed image's /data", out.stdout.decode().split(),
            [str(ds.expect["files"] + 1), "new", "deleted"])


def _check_podman_diff(pr, ds, proc):
    lines = set(proc.stdout.decode().splitlines())
    added = sum(1 for ln in lines if ln.startswith("A /data/new/d") and "/f" in ln)
    _expect("files listed as added", added, ds.expect["files"])
    for want in ("A /data/new/big.bin", "C /data/base/modify.txt", "D /data/base/delete.txt"):
        _expect(f"{want!r} listed", want in lines, True)


PODMAN_WORKLOADS = [
    Workload("podman-build", "podman build of 3 RUN steps on a busybox base image "
             f"({PODMAN_BUILD_FILES} files, 8 MiB, a tar of them)", "podman", "fresh", "podman",
             lambda pr, ds: ["podman", "build", "--network=none", "-t", PODMAN_BUILT,
                             "-f", str(ds.expect["context"] / "Containerfile"),
                             str(ds.expect["context"])],
             _check_podman_build, podman=lambda pr, ds: None),
    Workload("podman-run", "podman run --rm IMAGE true", "podman", "fresh", "podman",
             lambda pr, ds: ["podman", "run", "--rm", PODMAN_BASE, "true"],
             _check_podman_run, podman=lambda pr, ds: None),
    Workload("podman-reread", "dd of a file just written in a running container "
             "(written untimed with dd conv=fsync; read through /proc/PID/root)",
             "podman", "fresh", "podman",
             lambda pr, ds: ["dd", f"if=/proc/{pr.pid}/root/big.bin", "of=/dev/null", "bs=1M"],
             _check_read, podman=_podman_write_big),
    Workload("podman-commit", "podman commit of a running container that wrote "
             "small files, a big one, modified and deleted one", "podman", "fresh", "podman",
             lambda pr, ds: ["podman", "commit", "--quiet", PODMAN_CONTAINER, PODMAN_COMMITTED],
             _check_podman_commit, podman=_podman_change),
    Workload("podman-diff", "podman diff of the same container", "podman", "fresh", "podman",
             lambda pr, ds: ["podman", "diff", PODMAN_CONTAINER],
             _check_podman_diff, podman=_podman_change),
]
WORKLOADS += PODMAN_WORKLOADS

# --------------------------------------------------------------------------
# the run


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    reps: list[int] = field(default_factory=list)     # the repetition of each time
    errors: list[str] = field(default_factory=list)
    daemon: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


class Bench:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.code = snapshot_code(args.unionfs_code, work / "code")
        self.mounts = Mounts(args.timeout, args.unionfs_options, self.code)
        self.results: dict[str, dict[str, Cell]] = {}
        self.datasets: dict[str, Dataset] = {}
        self.seq = 0
        self.can_drop = os.geteuid() == 0

    def ratio(self, workload: str, of: str = "unionfs",
              to: str = "fuse-overlayfs") -> float | None:
        """Median `of` time / median `to` time (unionfs / fuse-overlayfs)."""
        u = self.results.get(workload, {}).get(of)
        f = self.results.get(workload, {}).get(to)
        if u and f and u.median is not None and f.median:
            return u.median / f.median
        return None

    def paired_ratios(self, workload: str) -> list[float]:
        """unionfs time / fuse-overlayfs time within each repetition (the two
        ran back to back, so what the machine was doing is shared)."""
        u = self.results.get(workload, {}).get("unionfs")
        f = self.results.get(workload, {}).get("fuse-overlayfs")
        if not (u and f):
            return []
        theirs = dict(zip(f.reps, f.times))
        return [t / theirs[r] for r, t in zip(u.reps, u.times) if theirs.get(r)]

    def root_for(self, wl: Workload, system: str, ds: Dataset, rundir: Path) -> Path:
        if system != "native":
            return rundir / "mnt"
        if wl.native == "shared":
            if ds.native_copy is None:
                ds.native_copy = self.work / "native" / ds.name
                merged_copy(ds, ds.native_copy, link=False, timeout=self.args.timeout)
            return ds.native_copy
        root = rundir / "root"
        merged_copy(ds, root, link=(wl.native == "link"), timeout=self.args.timeout)
        return root

    def one_run(self, wl: Workload, system: str, rep: int,
                profile_to: Path | None = None) -> tuple[float, dict | None]:
        """Time `wl` once on `system`; returns (seconds, daemon stats)."""
        if wl.podman is not None:
            return self.one_podman_run(wl, system, rep)
        ds = self.datasets[wl.dataset]
        self.seq += 1
        rundir = self.work / "runs" / f"{self.seq:04}-{wl.name}-{system}-{rep}"
        rundir.mkdir(parents=True)
        root = self.root_for(wl, system, ds, rundir)
        if wl.cache == "cold":
            if not self.can_drop:
                raise BenchError("dropping caches needs root")
        else:
            read_all(ds.lowers + ([root] if system == "native" else []))
        mounted = system != "native"
        t_mount = None
        try:
            if wl.cache == "cold":
                drop_caches()
            if mounted:
                t0 = time.perf_counter()
                self.mounts.mount(system, ds.lowers, rundir / "upper", rundir / "work", root,
                                  wl.options.get("unionfs" if system in UNIONFS_VARIANTS else system, ""))
                t_mount = time.perf_counter() - t0
            pid = daemon_pid(root) if system in FUSE_SYSTEMS else None
            before = daemon_stats(pid) if pid else None
            cmd = wl.command(root, ds)
            if wl.prepare is not None:
                run(wl.prepare(root, ds), self.args.timeout, capture=True)
            if wl.cache == "warm":
                wl.check(root, ds, run(cmd, self.args.timeout, capture=True))
            if wl.cache != "cold":
                os.sync()
            cpu0 = daemon_stats(pid)["cpu_s"] if pid else None
            spy = self.start_profiler(pid, profile_to) if profile_to else None
            try:
                t0 = time.perf_counter()
                proc = run(cmd, self.args.timeout, capture=True)
                elapsed = time.perf_counter() - t0
            finally:
                if spy:
                    self.stop_profiler(spy)
            if wl.name == "mount":
                elapsed = t_mount
            wl.check(root, ds, proc)
            stats = None
            if pid:
                stats = daemon_stats(pid)
                stats["fds_after_mount"] = before["fds"] if before else None
                # the daemon's CPU time in the timed run alone
                stats["cpu_run_s"] = stats["cpu_s"] - cpu0
            return elapsed, stats
        finally:
            if mounted:
                self.mounts.umount(system, root)

    def one_podman_run(self, wl: Workload, system: str, rep: int) -> tuple[float, dict | None]:
        """Time a podman row once on `system`, on a private podman of its own.

        Daemon figures: the mount program serving the container that the
        preparation started (reread, commit, diff), found by its mount, plus
        every daemon that podman started and stopped within the timed
        command (build's steps, run --rm, the image's mount in a diff),
        collected as they exit (DaemonReaper).
        """
        ds = self.datasets[wl.dataset]
        if "unavailable" in ds.expect:
            raise BenchError(ds.expect["unavailable"])
        self.seq += 1
        rundir = self.work / "runs" / f"{self.seq:04}-{wl.name}-{system}-{rep}"
        rundir.mkdir(parents=True)
        pr = PodmanRun(system, rundir / "graphroot", self.mounts.env_for(system),
                       self.args.timeout)
        reaper = DaemonReaper(pr.mount_program)
        reaper.set_subreaper(True)
        try:
            pr.podman("import", "--quiet", str(ds.expect["rootfs_tar"]), PODMAN_BASE)
            wl.podman(pr, ds)
            pid = None
            if pr.merged and system in FUSE_SYSTEMS:
                pid = daemon_pid(pr.merged)
                if pid is None:
                    raise BenchError(f"no daemon found serving {pr.merged}")
            before = daemon_stats(pid) if pid else None
            cmd = wl.command(pr, ds)
            os.sync()
            reaper.reap()       # orphans of the preparation: not this run's
            t0 = time.perf_counter()
            proc = run(cmd, self.args.timeout, capture=True, env=pr.env)
            elapsed = time.perf_counter() - t0
            stats = daemon_stats(pid) if pid else None
            # the daemons of mounts the command made and undid exit just after it
            deadline = time.monotonic() + 15
            while reaper.live(exclude=pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            exited, exited_cpu, exited_rss = reaper.reap()
            wl.check(pr, ds, proc)
            if system not in FUSE_SYSTEMS:
                return elapsed, None
            if stats:
                stats["fds_after_mount"] = before["fds"]
                stats["cpu_run_s"] = stats["cpu_s"] - before["cpu_s"] + exited_cpu
            else:
                stats = {"VmHWM": 0, "cpu_run_s": exited_cpu}
            stats["VmHWM"] = max(stats["VmHWM"], exited_rss)
            stats["exited_daemons"] = exited
            return elapsed, stats
        finally:
            pr.close()
            reaper.reap()
            reaper.set_subreaper(False)

    # -- profiling -------------------------------------------------------

    def start_profiler(self, pid: int | None, out: Path) -> subprocess.Popen | None:
        if pid is None:
            raise BenchError("no daemon pid to profile")
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if not spy:
            raise BenchError("py-spy not installed (pip install py-spy)")
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
             "--function", "--output", str(out), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach before the workload starts
        return proc

    @staticmethod
    def stop_profiler(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- driver ------------------------------------------------------------

    def run_all(self, workloads: list[Workload], systems: list[str]) -> None:
        why_not = {s: self.mounts.unavailable(s) for s in systems}
        for s, why in why_not.items():
            if why:
                print(f"bench: {s} will be reported as error: {why}", file=sys.stderr)
        needed = {wl.dataset for wl in workloads}
        t0 = time.perf_counter()
        self.datasets = build_datasets(self.work / "data", self.args.sizes, needed)
        print(f"bench: layers built in {time.perf_counter() - t0:.1f} s under {self.work}",
              file=sys.stderr)
        for wl in workloads:
            row = self.results.setdefault(wl.name, {})
            for rep in range(self.args.repeat):
                # rotate the order so no system always runs first
                order = systems[rep % len(systems):] + systems[:rep % len(systems)]
                for system in order:
                    cell = row.setdefault(system, Cell())
                    if wl.native == "none" and system == "native":
                        continue
                    if why_not[system]:
                        if not cell.errors:
                            cell.errors.append(why_not[system])
                        continue
                    try:
                        elapsed, stats = self.one_run(wl, system, rep)
                    except (BenchError, OSError) as e:
                        # OSError: a check or /proc read failed, e.g. a file
                        # missing from the mount or the daemon gone
                        cell.errors.append(str(e))
                        print(f"  {wl.name:<11} {system:<15} error: {e}", file=sys.stderr)
                        continue
                    cell.times.append(elapsed)
                    cell.reps.append(rep)
                    if stats:
                        cell.daemon.append(stats)
                    extra = ""
                    if stats:
                        extra = f"  (daemon peak RSS {stats['VmHWM'] / 1024:.0f} MiB, {stats.get('fds', '-')} fds)"
                    print(f"  {wl.name:<11} {system:<15} {elapsed:8.3f} s{extra}",
                          file=sys.stderr)

    def profile_all(self, workloads: list[Workload], outdir: Path) -> dict[str, list]:
        outdir.mkdir(parents=True, exist_ok=True)
        summary = {}
        for wl in workloads:
            if wl.name == "mount":
                continue
            out = outdir / f"{wl.name}.txt"
            try:
                self.one_run(wl, "unionfs", 0, profile_to=out)
            except (BenchError, OSError) as e:
                print(f"bench: profile {wl.name}: {e}", file=sys.stderr)
                continue
            if out.exists():
                summary[wl.name] = hotspots(out)
        return summary


def hotspots(raw: Path, top: int = 10) -> dict:
    """Self and inclusive sample shares per frame from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        # a thread sampled while running without Python frames (in libfuse)
        frames = stack.split(";") if stack else ["(no Python frame: in C)"]
        total += count
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for fr in set(frames):
            incl_n[fr] = incl_n.get(fr, 0) + count

    def rank(d):
        return [(fr, round(100 * c / total, 1)) for fr, c in
                sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []

    # unionfs frames, less the start-up path every daemon stack begins with
    entry = ("(unionfs/cli.py:", "(unionfs/mount.py:", "(unionfs/__main__.py:")
    ours = {fr: c for fr, c in incl_n.items()
            if "(unionfs/" in fr and not any(e in fr for e in entry)}
    return {"samples": total, "self": rank(self_n), "inclusive": rank(incl_n),
            "inclusive_unionfs": rank(ours)}


# --------------------------------------------------------------------------
# reporting


def code_version(which: str) -> str | None:
    """The git revision measured, with '+changes' for an edited work tree."""
    def git(*a):
        out = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""
    if which == "installed":
        return None
    rev = git("log", "-1", "--format=%h", "HEAD" if which == "worktree" else which,
              "--", "unionfs")
    if rev and which == "worktree" and git("status", "--porcelain", "--", "unionfs"):
        rev += "+changes"
    return rev or None


def machine_info(code: str) -> dict:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (out.stdout + out.stderr).strip().splitlines()
            return next((ln for ln in text if "fuse-overlayfs" in ln), text[0] if text else "")
        except (OSError, subprocess.TimeoutExpired):
            return None

    mem_kib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        from importlib.metadata import version
        fusepy = version("fusepy")
    except Exception:  # not installed: reported as unknown
        fusepy = None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kib / (1 << 20), 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fuse_overlayfs": first_line(["fuse-overlayfs", "--version"]),
        "fusepy": fusepy,
        "unionfs_commit": code_version(code),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                     if ln.startswith("model name")), None),
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.2f}")


def render_table(bench: Bench, workloads: list[Workload], systems: list[str]) -> str:
    notes: list[str] = []

    def note(text: str) -> int:
        # one footnote per distinct message, so a missing system is one line
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    head = ["workload"] + systems
    ratio = "unionfs" in systems and "fuse-overlayfs" in systems
    # Further ratios of unionfs: to kernel overlayfs, and to itself on its
    # former binding (the before/after of the same run).
    others = [o for o in ("overlayfs", "unionfs-libfuse3") if o in systems and "unionfs" in systems]
    head += [f"unionfs / {o}" for o in others]
    if ratio:
        head += ["unionfs / fuse-overlayfs", "unionfs faster", "goal"]
    rows = []
    missed = []
    for wl in workloads:
        row = [wl.name]
        cells = bench.results.get(wl.name, {})
        for s in systems:
            c = cells.get(s)
            if wl.native == "none" and s == "native":
                row.append("-")
            elif c is None or (not c.times and not c.errors):
                row.append("-")
            elif not c.times:
                row.append(f"error[{note(f'{s}: {c.errors[0]}')}]")
            else:
                mark = ""
                if c.errors:
                    mark = f" [{note(f'{s}: {len(c.errors)} of {len(c.errors) + len(c.times)} runs failed: {c.errors[0]}')}]"
                row.append(fmt(c.median) + mark)
        for o in others:
            r = bench.ratio(wl.name, "unionfs", o)
            row.append("-" if r is None else f"{r:.2f}")
        if ratio:
            r = bench.ratio(wl.name)
            row.append("-" if r is None else f"{r:.2f}")
            pairs = bench.paired_ratios(wl.name)
            row.append(f"{sum(p < 1 for p in pairs)} of {len(pairs)}" if pairs else "-")
            row.append(_goal_cell(wl, r, bench.ratio(wl.name, "unionfs", "overlayfs"), missed))
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if ratio:
        goals = [wl for wl in workloads if wl.goal is not None or wl.kernel_goal is not None]
        lines.append(f"\nunionfs goals met: {len(goals) - len(missed)} of {len(goals)}"
                     + (f"; missed: {', '.join(missed)}" if missed else ""))
        lines.append("\"unionfs faster\": in how many repetitions unionfs beat "
                     "fuse-overlayfs, the two having run back to back.")
    text = "\n".join(lines)

    # what the daemons held after each workload
    dmn = []
    for wl in workloads:
        parts = []
        for s in FUSE_SYSTEMS:
            c = bench.results.get(wl.name, {}).get(s)
            if s in systems and c and c.daemon:
                hwm = max(d["VmHWM"] for d in c.daemon) / 1024
                cpu = statistics.median(d["cpu_run_s"] for d in c.daemon)
                fd_text = ""
                if all("fds" in d for d in c.daemon):   # podman build/run: no daemon left
                    fds = max(d["fds"] for d in c.daemon)
                    fds0 = max(d["fds_after_mount"] or 0 for d in c.daemon)
                    fd_text = f", fds {fds0} -> {fds}"
                    path_fds = max(d.get("path_fds", 0) for d in c.daemon)
                    if path_fds:
                        fd_text += f" (+{path_fds} O_PATH)"
                came_and_went = max((d.get("exited_daemons", 0) for d in c.daemon), default=0)
                if came_and_went:
                    fd_text += f", {came_and_went} daemons came and went"
                parts.append(f"{cpu:.2f} s, {hwm:.0f} MiB{fd_text}")
            elif s in systems:
                parts.append("-")
        if any(p != "-" for p in parts):
            dmn.append(f"| {wl.name} | " + " | ".join(parts) + " |")
    if dmn:
        cols = [s for s in FUSE_SYSTEMS if s in systems]
        text += ("\n\nDaemon CPU time in the timed run (user + system, median), peak "
                 "RSS (VmHWM) and open fds (after mount -> after the run, worst over "
                 "repetitions; O_PATH ones apart: unionfs's bounded cache of "
                 "directory handles):\n\n| workload | " + " | ".join(cols) +
                 " |\n|---|" + "---|" * len(cols) + "\n" + "\n".join(dmn))
    if notes:
        text += "\n\n" + "\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return text


def to_json(bench: Bench, workloads, systems, info, sizes: Sizes, hot) -> dict:
    res = {}
    for wl in workloads:
        res[wl.name] = {"about": wl.about, "cache": wl.cache, "systems": {}}
        for s, c in bench.results.get(wl.name, {}).items():
            res[wl.name]["systems"][s] = {
                "median_s": c.median, "times_s": c.times, "repetitions": c.reps,
                "errors": c.errors,
                "daemon": c.daemon}
        res[wl.name]["ratio_unionfs_fuse_overlayfs"] = bench.ratio(wl.name)
        res[wl.name]["paired_ratios"] = bench.paired_ratios(wl.name)
        res[wl.name]["goal"] = wl.goal
        res[wl.name]["kernel_goal"] = wl.kernel_goal
    return {"machine": info, "sizes": sizes.__dict__, "repeat": bench.args.repeat,
            "unionfs_code": bench.args.unionfs_code,
            "systems": systems, "unionfs_options": bench.args.unionfs_options,
            "results": res, "hotspots": hot}


# --------------------------------------------------------------------------


def default_loop_gib(args) -> int:
    """Room for every file a run keeps until the end (uppers are not deleted
    between runs): the big file's copies and the writes dominate."""
    sz = args.sizes
    runs = args.repeat * len(args.system_list) + 1      # + the profiling run
    mib = sz.big_mib * (2 + 2 * runs) + sz.write_mib * runs
    # chown-R: the image tree (big_mib // 2 in big files, small files of
    # 16 KiB on average), copied whole by native and fuse-overlayfs runs; and
    # a GiB for dpkg's, untar's and the podman rows' (one run's at a time)
    mib += (sz.big_mib // 2 + sz.image_files // 32) * runs + 1024
    # the --scale trees: inode tables (256 bytes each) and directory blocks
    mib += scale_inodes(args) * 512 // MIB
    return max(2, -(-mib // 1024) + 2)


def scale_inodes(args) -> int:
    """Inodes the --scale trees need (each twice: lowers and the native
    copy), with room for everything else; 0 if no such row runs."""
    sz = args.sizes
    n = 0
    if any(w.dataset == "huge" for w in args.workloads):
        n += sz.huge_dirs * (HUGE_FILES_PER_DIR + 1)
    if any(w.dataset == "layers" for w in args.workloads):
        n += sz.layers_count * (sz.layer_files + 100)
    return 2 * n + 1_000_000 if n else 0


def parse_args(argv):
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(
        description="Run the same workloads on native, overlayfs, fuse-overlayfs and unionfs.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and one repetition: a smoke run of under a minute")
    p.add_argument("--scale", action="store_true",
                   help="add the long rows on large trees: find over 505,000 files in one "
                        "lower, find and ls -lR over 128 lowers (~20 min in full size; "
                        "they also run when named in --only)")
    p.add_argument("--repeat", type=int, default=None,
                   help="repetitions per workload and system (default 3, --quick 1)")
    p.add_argument("--only", default="",
                   help="comma-separated workloads: " + ",".join(names))
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated systems (default: all four)")
    p.add_argument("--tree-files", type=int, metavar="N", default=None,
                   help="files in the find/ls tree (rounded to hundreds; default 20000, "
                        "--quick 3000), e.g. 100000 to check the daemon's memory")
    p.add_argument("--json", default="bench-results.json", help="where to write the results")
    p.add_argument("--workdir", default=None,
                   help="scratch space (a new directory is made inside; default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--loop-ext4", type=int, metavar="GIB", default=None,
                   help="work on a private journaled ext4 of GIB GiB on a loop device, "
                        "isolated from other disk activity; 0: work in the workdir itself "
                        "(default: a loop fs sized for the run when root with losetup and "
                        "mkfs.ext4, else 0)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command")
    p.add_argument("--unionfs-code", default="worktree", metavar="WHICH",
                   help="the unionfs code to measure: 'worktree' (a copy taken at the "
                        "start, default), a git revision (e.g. HEAD) or 'installed'")
    p.add_argument("--unionfs-options", default="",
                   help="extra -o options for unionfs only (for experiments)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after the timed runs, one more unionfs run per workload under "
                        "py-spy; raw stacks and hotspots go to DIR")
    args = p.parse_args(argv)
    only = [n for n in args.only.split(",") if n] or [
        w.name for w in WORKLOADS if args.scale or not w.scale]
    bad = [n for n in only if n not in names]
    if bad:
        p.error(f"unknown workload {bad[0]!r} (choose from {', '.join(names)})")
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"unknown system {bad[0] if bad else ''!r} (choose from {', '.join(SYSTEMS)})")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.sizes = QUICK if args.quick else FULL
    if args.tree_files is not None:
        if args.tree_files < 100:
            p.error("--tree-files must be at least 100")
        args.sizes = dataclasses.replace(args.sizes, tree_dirs=args.tree_files // 100)
    args.workloads = [w for w in WORKLOADS if w.name in only]
    args.system_list = [s for s in SYSTEMS if s in systems]
    if args.loop_ext4 is None:
        args.loop_ext4 = default_loop_gib(args) if LoopFs.possible() else 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="unionfs-bench-", dir=args.workdir)).resolve()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    info = machine_info(args.unionfs_code)
    if info["loadavg_at_start"][0] > 0.5:
        # Other work on two cores shows up as noise, mostly in the FUSE rows.
        print(f"bench: load average is {info['loadavg_at_start'][0]} before starting; "
              "numbers will be noisy", file=sys.stderr)
    bench = loop = None
    hot = {}
    interrupted = False
    try:
        base = work
        if args.loop_ext4:
            free_gib = shutil.disk_usage(work).free >> 30
            if free_gib < args.loop_ext4:
                raise BenchError(f"{work}: {free_gib} GiB free, the run needs about "
                                 f"{args.loop_ext4} (see --loop-ext4, --quick, --workdir)")
            loop = LoopFs(work, args.timeout)
            base = loop.create(args.loop_ext4, scale_inodes(args) or None)
        bench = Bench(args, base)
        info["unionfs_libfuse"] = bench.mounts.libfuse_version()
        bench.run_all(args.workloads, args.system_list)
        if args.profile and "unionfs" in args.system_list:
            hot = bench.profile_all(args.workloads, Path(args.profile))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; results so far follow", file=sys.stderr)
    finally:
        if bench:
            bench.mounts.umount_all()
        if loop:
            loop.destroy(keep_image=args.keep)
        if args.keep:
            print(f"bench: scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if bench is None:
        return 130

    sizes = args.sizes
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["scratch"] = f"loop-mounted ext4 ({args.loop_ext4} GiB)" if args.loop_ext4 else "workdir"
    print(f"\nunionfs benchmark, {info['date']}: median of {args.repeat} run(s), seconds "
          f"({'quick' if args.quick else 'full'} sizes: read/copy-up {sizes.big_mib} MiB, "
          f"write {sizes.write_mib} MiB, find/ls {sizes.tree_dirs * sizes.tree_files_per_dir} "
          f"files, untar {sizes.untar_files}, rm {sizes.rm_files}; unionfs code "
          f"{info['unionfs_commit']} on {info.get('unionfs_libfuse') or '?'}; load average {info['loadavg_at_start'][0]} -> "
          f"{info['loadavg_at_end'][0]})\n")
    print(render_table(bench, args.workloads, args.system_list))
    for name, h in hot.items():
        print(f"\nunionfs hotspots, {name} ({h['samples']} samples; % of samples, self):")
        for fr, pct in h["self"][:8]:
            print(f"  {pct:5.1f}%  {fr}")
        print("  inclusive, unionfs frames:")
        for fr, pct in h["inclusive_unionfs"][:8]:
            print(f"  {pct:5.1f}%  {fr}")
    with open(args.json, "w") as f:
        json.dump(to_json(bench, args.workloads, args.system_list, info, sizes, hot),
                  f, indent=1)
    print(f"\nresults written to {args.json}", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
