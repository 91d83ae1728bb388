"""Differential testing of a union filesystem against kernel overlayfs.

One *sequence* is: generate a random logical layer stack from a seed (2-3
lowers and an upper), build it on disk twice, mount kernel overlayfs on one
copy and the filesystem under test (the *target*) on the other, apply the same
random operations to both mounts and compare every result (value or errno),
then compare the merged trees, remount the target and compare again, and, when
the target wrote overlay-format whiteouts onto overlay-format layers, mount
kernel overlayfs on the target's own lower+upper and compare once more.

The two physical copies hold the same logical tree:
- the *kernel* copy is pure overlay format (whiteout = char device 0/0, opaque
  directory = xattr trusted.overlay.opaque=y), because kernel overlayfs does not
  understand OCI markers;
- the *target* copy is either the same pure overlay format, or "mixed": every
  whiteout and opaque marker is written, by a per-entry coin flip fixed at
  generation time, as an overlay marker or as an OCI one (.wh.NAME,
  .wh..wh..opq).

Everything random comes from one `random.Random(seed)`: the tree first, then
the operations, which are chosen by looking at the kernel mount (so a seed
replays exactly). A divergence raises `Divergence` carrying the executed
operations; `shrink` replays subsets of them to find a short reproduction.

Known, accepted differences are explained where the code ignores them, and
nothing else is ignored: `norm_stat` and `norm_time` (fields two filesystems
legitimately disagree on), `Leeway` (kernel side effects of failed renames),
`_prune_unmerged_whiteouts` (a kernel quirk kept out of the generated trees),
`OpGen.next` (device nodes are not opened: that would drive the host's device).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from unionfs.osutil import RENAME_EXCHANGE, RENAME_NOREPLACE, rename2

# --- on-disk format constants ------------------------------------------------

#: OCI/aufs whiteout prefix: `.wh.NAME` hides NAME in the layers below.
WH_PREFIX = ".wh."
#: OCI/aufs opaque marker: a directory holding it hides the layers below.
WH_OPAQUE = ".wh..wh..opq"
#: overlayfs opaque-directory xattr (value "y"), trusted namespace (we are root).
OVL_OPAQUE_XATTR = "trusted.overlay.opaque"

# --- generation parameters ----------------------------------------------------

#: Names used in layers and by operations. Deliberately few, so layers collide
#: and operations hit existing entries. None starts with WH_PREFIX: those names
#: are reserved in the target's OCI mode and meaningless to kernel overlayfs.
NAMES = ("a", "b", "c", "d", "e")
NEW_NAMES = NAMES + ("n", "m")
MAX_DEPTH = 3
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o640, 0o4755)
DIR_MODES = (0o755, 0o700, 0o555, 0o775)
OWNERS = ((0, 0), (0, 0), (1000, 1000), (1234, 100))
XATTR_NAMES = ("user.a", "user.b", "user.c")
#: Dangling absolute symlink targets. The directory must not exist on the host:
#: operations that follow these links must fail, never write outside the test.
ABS_TARGET_DIR = "/nonexistent-unionfs-difftest"

#: Every timestamp the generator or an explicit utime sets lies before CUTOFF;
#: a timestamp at or after it was set by the system ("now"). See norm_time.
GEN_TIME_LO = 978307200 * 10**9      # 2001-01-01
GEN_TIME_HI = 1262304000 * 10**9     # 2010-01-01
CUTOFF_NS = 1420070400 * 10**9       # 2015-01-01

#: Mount points sit SANDBOX_DEPTH empty directories deep, identically on both
#: sides: a relative symlink that climbs out of the mount (at most MAX_CLIMB
#: levels, see _gen_target) resolves into a private, symmetric sandbox. Paths
#: in operations only use NAMES, so they cannot reach the layers from there.
SANDBOX_DEPTH = 4
MAX_CLIMB = 2

SUBPROCESS_TIMEOUT = 60
#: A sequence taking longer than this is considered hung: the target's daemon
#: is killed so blocked syscalls return (ENOTCONN) and the mounts can go away.
SEQUENCE_WATCHDOG_S = 120


class Divergence(AssertionError):
    """The target and kernel overlayfs disagree."""

    def __init__(self, stage: str, detail: str, executed: list):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail
        self.executed = executed


# --- the logical tree ---------------------------------------------------------

@dataclasses.dataclass
class Entry:
    kind: str                  # file dir symlink fifo chardev whiteout hardlink
    mode: int = 0o644
    data: bytes = b""
    target: str = ""
    opaque: bool = False
    oci_marker: bool = False   # mixed copy: write the OCI marker, not overlay's
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "whiteout":
            return "whiteout" + (" (oci)" if self.oci_marker else "")
        if self.kind == "hardlink":
            return "hard link to " + self.target
        parts = [self.kind, f"{self.mode:04o}", f"{self.uid}:{self.gid}",
                 f"mtime={self.mtime_ns}"]
        if self.kind == "file":
            parts.append(repr(self.data))
        if self.kind == "symlink":
            parts.append("-> " + self.target)
        if self.opaque:
            parts.append("opaque" + (" (oci)" if self.oci_marker else ""))
        if self.xattrs:
            parts.append(repr(self.xattrs))
        return " ".join(parts)


@dataclasses.dataclass
class Stack:
    lowers: list               # top first; each a dict relpath -> Entry
    upper: dict
    root_mtimes: list          # mtime of each layer root, lowers then upper

    def describe(self) -> str:
        out = []
        named = [(f"lower{i} (top={i == 0})", l) for i, l in enumerate(self.lowers)]
        for title, layer in named + [("upper", self.upper)]:
            out.append(f"  {title}:")
            for path in sorted(layer):
                out.append(f"    {path}: {layer[path].describe()}")
        return "\n".join(out)


def _gen_time(rng: random.Random) -> int:
    return rng.randrange(GEN_TIME_LO, GEN_TIME_HI)


def _text(rng: random.Random, lo: int, hi: int) -> bytes:
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789")
                 for _ in range(rng.randint(lo, hi)))


def _gen_target(rng: random.Random, link_path: str) -> str:
    """A symlink target: relative (to a random tree path, possibly missing,
    climbing at most to the mount root) or absolute and dangling."""
    if rng.random() < 0.15:
        return f"{ABS_TARGET_DIR}/{rng.choice(NAMES)}"
    depth = rng.randint(1, MAX_DEPTH)
    dest = "/".join(rng.choice(NAMES) for _ in range(depth))
    link_dir = os.path.dirname(link_path) or "."
    rel = os.path.relpath(dest, link_dir)
    # Wherever the link ends up (renamed to the root, or created through a
    # symlinked parent), it climbs at most MAX_CLIMB levels above the mount.
    if rel.split("/").count("..") > MAX_CLIMB or rng.random() < 0.2:
        return rng.choice(NAMES)
    return rel


def _gen_layer(rng: random.Random, bottom: bool) -> dict:
    layer: dict = {}
    density = {1: 0.6, 2: 0.45, 3: 0.35}

    def gen_dir(prefix: str, depth: int) -> None:
        for name in NAMES:
            if rng.random() > density[depth]:
                continue
            path = f"{prefix}{name}"
            uid, gid = rng.choice(OWNERS)
            roll = rng.random()
            if depth < MAX_DEPTH and roll < 0.35:
                e = Entry("dir", mode=rng.choice(DIR_MODES),
                          opaque=(not bottom and rng.random() < 0.3))
                layer[path] = e
                gen_dir(path + "/", depth + 1)
            elif roll < 0.62:
                e = Entry("file", mode=rng.choice(FILE_MODES), data=_text(rng, 0, 24))
            elif roll < 0.77:
                e = Entry("symlink", mode=0o777, target=_gen_target(rng, path))
            elif roll < 0.91:
                e = Entry("whiteout")
            elif roll < 0.97:
                e = Entry("fifo", mode=rng.choice((0o644, 0o600)))
            else:
                e = Entry("chardev", mode=0o666)   # 1:3 like /dev/null
            e.oci_marker = rng.random() < 0.5
            if e.kind != "whiteout":
                e.uid, e.gid = uid, gid
                e.mtime_ns = _gen_time(rng)
            if e.kind in ("file", "dir") and rng.random() < 0.2:
                e.xattrs = {rng.choice(XATTR_NAMES): _text(rng, 0, 8)}
            layer[path] = e

    gen_dir("", 1)
    return layer


def dir_stack(layers: list, path: str) -> list:
    """Indexes of the layers (top first) whose directories merge at `path`,
    following overlayfs lookup: a whiteout or a non-directory ends the merge,
    and so does an opaque directory (after contributing itself)."""
    if not path:
        return list(range(len(layers)))
    parent = dir_stack(layers, os.path.dirname(path))
    out = []
    for i in parent:
        e = layers[i].get(path)
        if e is None:
            continue
        if e.kind != "dir":
            break
        out.append(i)
        if e.opaque:
            break
    return out


def _prune_unmerged_whiteouts(layers: list) -> None:
    """Drop whiteouts from directories that kernel overlayfs does not merge.

    Kernel overlayfs lists a directory that comes from a single layer
    straight from that layer (ovl_dir_is_real), whiteout devices included,
    although looking them up fails: an accepted kernel quirk, not a semantic
    to compare against. The kernel never writes such whiteouts itself; OCI
    layers do, and the target must hide them — that is left to unit tests."""
    for layer in layers:
        for path in [p for p, e in layer.items() if e.kind == "whiteout"]:
            parent = os.path.dirname(path)
            if parent and len(dir_stack(layers, parent)) < 2:
                del layer[path]


def gen_stack(rng: random.Random) -> Stack:
    nlowers = rng.randint(2, 3)
    lowers = [_gen_layer(rng, bottom=(i == nlowers - 1)) for i in range(nlowers)]
    upper = _gen_layer(rng, bottom=False)
    _prune_unmerged_whiteouts([upper] + lowers)
    return Stack(lowers, upper, [_gen_time(rng) for _ in range(nlowers + 1)])


# --- building a layer on disk -------------------------------------------------

def _depth(path: str) -> int:
    return path.count("/")


def build_layer(layer: dict, root: str, fmt: str, root_mtime: int) -> None:
    """Write `layer` under `root` in `fmt` ("overlay" or "mixed")."""
    os.mkdir(root)
    # Hard links last: their target must exist.
    for path in sorted(layer, key=lambda p: (layer[p].kind == "hardlink", _depth(p), p)):
        e = layer[path]
        p = os.path.join(root, path)
        oci = fmt == "mixed" and e.oci_marker
        if e.kind == "dir":
            os.mkdir(p)
            if e.opaque and oci:
                open(os.path.join(p, WH_OPAQUE), "wb").close()
            elif e.opaque:
                os.setxattr(p, OVL_OPAQUE_XATTR, b"y")
        elif e.kind == "file":
            with open(p, "wb") as f:
                f.write(e.data)
        elif e.kind == "symlink":
            os.symlink(e.target, p)
        elif e.kind == "fifo":
            os.mkfifo(p)
        elif e.kind == "chardev":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        elif e.kind == "whiteout" and oci:
            d, n = os.path.split(p)
            open(os.path.join(d, WH_PREFIX + n), "wb").close()
        elif e.kind == "whiteout":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif e.kind == "hardlink":
            os.link(os.path.join(root, e.target), p)
    # Metadata deepest first, so a directory's mtime is set after its entries.
    for path in sorted(layer, key=lambda p: (-_depth(p), p)):
        e = layer[path]
        if e.kind in ("whiteout", "hardlink"):
            continue        # (a hard link has its target's metadata)
        p = os.path.join(root, path)
        os.chown(p, e.uid, e.gid, follow_symlinks=False)  # before chmod: clears suid
        if e.kind != "symlink":
            os.chmod(p, e.mode)
        for k, v in e.xattrs.items():
            os.setxattr(p, k, v)
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    os.chmod(root, 0o755)
    os.utime(root, ns=(root_mtime, root_mtime))


@dataclasses.dataclass
class Side:
    """One physical copy: layers, workdir and a sandboxed mount point."""
    base: str
    nlowers: int

    @property
    def lowers(self) -> list:
        return [os.path.join(self.base, "layers", f"l{i}") for i in range(self.nlowers)]

    @property
    def upper(self) -> str:
        return os.path.join(self.base, "layers", "upper")

    def workdir(self, tag: str = "work") -> str:
        return os.path.join(self.base, "layers", tag)

    def mountpoint(self, tag: str = "mnt") -> str:
        return os.path.join(self.base, *[f"s{i}" for i in range(SANDBOX_DEPTH)], tag)

    def build(self, stack: Stack, fmt: str) -> None:
        os.makedirs(os.path.join(self.base, "layers"))
        for layer, lower, t in zip(stack.lowers, self.lowers, stack.root_mtimes):
            build_layer(layer, lower, fmt, t)
        build_layer(stack.upper, self.upper, fmt, stack.root_mtimes[-1])
        for tag in ("work", "work2"):
            os.mkdir(self.workdir(tag))
        for tag in ("mnt", "mnt2"):
            os.makedirs(self.mountpoint(tag))


# --- mounting -------------------------------------------------------------------

def _mount_points() -> list:
    """Every mount point, octal escapes decoded."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def is_mounted(path: str) -> bool:
    return path in _mount_points()


def mounts_under(prefix: str) -> list:
    prefix = prefix.rstrip("/") + "/"
    return [mp for mp in _mount_points() if mp.startswith(prefix)]


def _run(argv: list, what: str) -> None:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: timed out: {' '.join(argv)}") from None
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {' '.join(argv)}\n"
                           f"{r.stderr.strip()}")


def _quiet(argv: list) -> None:
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def force_unmount(mnt: str, first: list | None = None) -> None:
    """Unmount `mnt` by every means, politest first; no-op if not mounted."""
    for argv in ([first] if first else []) + [["umount", mnt], ["umount", "-l", mnt]]:
        if not is_mounted(mnt):
            return
        _quiet(argv)
    if is_mounted(mnt):
        raise RuntimeError(f"cannot unmount {mnt}")


def _fuse_daemon_pids(mnt: str) -> list:
    """Pids of processes holding /dev/fuse whose argv names `mnt`: the daemon
    this test started for that (unique, temporary) mount point."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if mnt.encode() not in argv:
                continue
            fds = os.listdir(f"/proc/{d}/fd")
            if any(os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse" for fd in fds):
                pids.append(int(d))
        except OSError:
            continue
    return pids


class KernelOverlay:
    name = "kernel-overlayfs"

    def __init__(self, fidelity: bool = False):
        self.fidelity = fidelity

    def mount(self, lowers: list, upper: str, work: str, mnt: str) -> None:
        # redirect_dir=on makes directory renames comparable (no EXDEV);
        # index and metacopy are pinned (off, or on for the fidelity
        # variant) so the reference does not depend on the kernel's
        # build-time defaults.
        features = "index=on,metacopy=on" if self.fidelity else "index=off,metacopy=off"
        opts = (f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},"
                f"redirect_dir=on,{features}")
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], "kernel overlay mount")

    def umount(self, mnt: str) -> None:
        force_unmount(mnt)


class FuseTarget:
    """The filesystem under test, chosen by $DIFFTEST_TARGET:
    "unionfs" (default) or "fuse-overlayfs" (a reference FUSE overlay, useful
    to check the harness itself)."""

    def __init__(self, kind: str | None = None):
        self.kind = kind or os.environ.get("DIFFTEST_TARGET", "unionfs")
        if self.kind not in ("unionfs", "fuse-overlayfs"):
            raise ValueError(f"DIFFTEST_TARGET={self.kind!r}: want unionfs or fuse-overlayfs")
        self.name = self.kind

    @staticmethod
    def unionfs_argv() -> list:
        exe = Path(sys.executable).parent / "unionfs"
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "unionfs"]

    def mount(self, lowers: list, upper: str, work: str, mnt: str, whiteout: str,
              extra: str = "") -> None:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        if extra and self.kind == "unionfs":
            opts += "," + extra
        if os.environ.get("DIFFTEST_TARGET_OPTS"):      # experiments only
            opts += "," + os.environ["DIFFTEST_TARGET_OPTS"]
        if self.kind == "unionfs":
            argv = self.unionfs_argv() + ["mount", "-o", f"{opts},whiteout={whiteout}", mnt]
        else:
            argv = ["fuse-overlayfs", "-o", opts, mnt]
        _run(argv, f"{self.kind} mount")
        if not is_mounted(mnt):
            raise RuntimeError(f"{self.kind} mount returned but {mnt} is not a mount point")

    def umount(self, mnt: str) -> None:
        if self.kind == "unionfs":
            first = self.unionfs_argv() + ["umount", mnt]
        else:
            first = ["fusermount3", "-u", mnt]
        force_unmount(mnt, first)

    def umount_checked(self, mnt: str) -> None:
        """The user's unmount command must work on its own."""
        if self.kind == "unionfs":
            _run(self.unionfs_argv() + ["umount", mnt], "unionfs umount")
        else:
            _run(["fusermount3", "-u", mnt], "fusermount3 -u")
        if is_mounted(mnt):
            raise RuntimeError(f"{mnt} still mounted after unmount")

    def kill_daemon(self, mnt: str) -> None:
        for pid in _fuse_daemon_pids(mnt):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- operations -----------------------------------------------------------------

def _p(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


_FLAG_BITS = {n: getattr(os, n) for n in
              ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND")}


def _open(root, path, flags, mode=0o644):
    bits = os.O_NONBLOCK    # a fifo must never block the test
    for f in flags:
        bits |= _FLAG_BITS[f]
    return os.open(_p(root, path), bits, mode)


def _read_all(fd: int) -> bytes:
    chunks = []
    while sum(map(len, chunks)) < 1 << 16:
        b = os.read(fd, 4096)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def op_create(root, path, flags, mode, data):
    fd = _open(root, path, flags, mode)
    try:
        return os.write(fd, data) if data else 0
    finally:
        os.close(fd)


def op_write(root, path, offset, data):
    fd = _open(root, path, ("O_WRONLY",))
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def op_append(root, path, data):
    fd = _open(root, path, ("O_WRONLY", "O_APPEND"))
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def op_rdwr(root, path, offset, data):
    """Write then read back through the same descriptor."""
    fd = _open(root, path, ("O_RDWR",))
    try:
        n = os.pwrite(fd, data, offset)
        return n, os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def op_otrunc(root, path):
    os.close(_open(root, path, ("O_WRONLY", "O_TRUNC")))


def op_truncate(root, path, length):
    os.truncate(_p(root, path), length)


def op_read(root, path):
    fd = _open(root, path, ("O_RDONLY",))
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def op_stat(root, path, follow):
    return norm_stat(os.stat(_p(root, path), follow_symlinks=follow))


def op_listdir(root, path):
    return sorted(os.listdir(_p(root, path)))


def op_unlink(root, path):
    os.unlink(_p(root, path))


def op_rmdir(root, path):
    os.rmdir(_p(root, path))


def op_mkdir(root, path, mode):
    os.mkdir(_p(root, path), mode)


def op_mkfifo(root, path, mode):
    os.mkfifo(_p(root, path), mode)


def op_rename(root, src, dst):
    os.rename(_p(root, src), _p(root, dst))


def op_rename_noreplace(root, src, dst):
    rename2(_p(root, src), _p(root, dst), RENAME_NOREPLACE)


def op_exchange(root, a, b):
    rename2(_p(root, a), _p(root, b), RENAME_EXCHANGE)


def op_symlink(root, target, path):
    os.symlink(target, _p(root, path))


def op_readlink(root, path):
    return os.readlink(_p(root, path))


def op_link(root, src, dst, follow):
    os.link(_p(root, src), _p(root, dst), follow_symlinks=follow)


def op_chmod(root, path, mode):
    os.chmod(_p(root, path), mode)


def op_chown(root, path, uid, gid, follow):
    os.chown(_p(root, path), uid, gid, follow_symlinks=follow)


def op_utime(root, path, ns, follow):
    if ns is None:
        os.utime(_p(root, path), follow_symlinks=follow)   # "now"
    else:
        os.utime(_p(root, path), ns=ns, follow_symlinks=follow)


def op_setxattr(root, path, name, value, flags, follow):
    os.setxattr(_p(root, path), name, value, flags, follow_symlinks=follow)


def op_getxattr(root, path, name, follow):
    return os.getxattr(_p(root, path), name, follow_symlinks=follow)


def op_listxattr(root, path, follow):
    # The whole list, not only user.*: private markers must not leak.
    return sorted(os.listxattr(_p(root, path), follow_symlinks=follow))


def op_removexattr(root, path, name, follow):
    os.removexattr(_p(root, path), name, follow_symlinks=follow)


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def apply_op(root: str, op: tuple):
    """Run `op` on the mount at `root`: ("ok", value) or ("err", ERRNO_NAME)."""
    name, *args = op
    try:
        return ("ok", OPS[name](root, *args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def format_op(op: tuple) -> str:
    name, *args = op
    return f"{name}({', '.join(map(repr, args))})"


# --- normalised stat and tree snapshots ----------------------------------------

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
          stat.S_IFSOCK: "socket"}


def norm_time(ns: int):
    """Exact if the time was set explicitly (by the generator or a utime op:
    always before CUTOFF_NS), else "now": system-chosen times differ between
    two mounts by the microseconds between the two calls. A time that is
    explicit on one side and "now" on the other is a divergence."""
    return ns if ns < CUTOFF_NS else "now"


def norm_stat(st: os.stat_result) -> dict:
    """The stat fields that must agree. Deliberately ignored, because they
    legitimately differ between two filesystems holding the same tree:
    st_ino and st_dev (different inode spaces); atime (reads on one side
    only would already change it, and relatime makes it unpredictable); ctime
    (always "now", set by the system); st_blocks (allocation);
    a directory's st_size and st_nlink (filesystem-specific: overlayfs
    reports its own and fuse reports the backing directory's)."""
    fmt = stat.S_IFMT(st.st_mode)
    d = {"type": _TYPES.get(fmt, oct(fmt)), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
         "uid": st.st_uid, "gid": st.st_gid, "mtime": norm_time(st.st_mtime_ns)}
    if fmt != stat.S_IFDIR:
        d["size"] = st.st_size
        d["nlink"] = st.st_nlink
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d


def snapshot(root: str, d_ino: bool = False) -> dict:
    """relpath -> everything observable about the entry, without following
    symlinks: normalised lstat, data or target, xattr names and user.* values,
    which paths share an inode, and with ``d_ino`` which entries readdir
    lists with another number than stat shows (kernel overlayfs makes them
    agree with index=on; with index=off some may differ, see
    ``d_ino_mismatches``)."""
    tree = {}

    def attempt(fn, *args):
        # A failure is part of the observation (a listed entry that cannot
        # be looked up, a file that cannot be read), not a harness crash.
        try:
            return fn(*args)
        except OSError as e:
            return f"error {errno.errorcode.get(e.errno, e.errno)}"

    def xattrs(p):
        names = sorted(os.listxattr(p, follow_symlinks=False))
        return {n: attempt(lambda: os.getxattr(p, n, follow_symlinks=False)) if n.startswith("user.")
                else "(value not compared)" for n in names}

    def data(p):
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def visit(rel: str) -> None:
        p = _p(root, rel)
        st = attempt(os.lstat, p)
        if isinstance(st, str):
            tree[rel] = {"lstat": st}
            return
        rec = norm_stat(st)
        rec["xattrs"] = attempt(xattrs, p)
        if stat.S_ISREG(st.st_mode):
            rec["data"] = attempt(data, p)
        elif stat.S_ISLNK(st.st_mode):
            rec["target"] = attempt(os.readlink, p)
        tree[rel] = rec
        if stat.S_ISDIR(st.st_mode):
            names = attempt(os.listdir, p)
            if isinstance(names, str):
                rec["listdir"] = names
                return
            for name in sorted(names):
                visit(f"{rel}/{name}" if rel else name)

    visit("")
    _add_inode_relations(root, tree, d_ino)
    return tree


def d_ino_mismatches(root: str) -> list:
    """Entries whose readdir d_ino is not their st_ino: the target must
    have none, whatever the reference does."""
    out = []
    for rel, rec in sorted(snapshot(root, d_ino=True).items()):
        names = rec.get("d_ino_is_st_ino")
        if isinstance(names, list):         # (a string: listing it failed)
            out += [f"{rel}/{n}" for n in names]
    return out


def _add_inode_relations(root: str, tree: dict, d_ino: bool) -> None:
    """What inode numbers say, comparable across filesystems: for every
    non-directory the other paths with the same st_ino (hard links, and no
    accidental sharing), and with ``d_ino`` for every directory the entries
    whose readdir d_ino is not their st_ino."""
    by_ino: dict = {}
    for rel, rec in tree.items():
        try:
            st = os.lstat(_p(root, rel))
        except OSError:
            continue
        rec["_ino"] = st.st_ino
        by_ino.setdefault(st.st_ino, []).append(rel)
    for rel, rec in tree.items():
        ino = rec.pop("_ino", None)
        if ino is None:
            continue
        if rec.get("type") != "dir":
            rec["same_inode_as"] = [p for p in by_ino[ino] if p != rel]
        elif len(by_ino[ino]) > 1:
            rec["same_inode_as"] = [p for p in by_ino[ino] if p != rel]
        if d_ino and rec.get("type") == "dir" and "listdir" not in rec:
            try:
                with os.scandir(_p(root, rel)) as it:
                    rec["d_ino_is_st_ino"] = sorted(
                        de.name for de in it
                        if de.inode() != os.lstat(de.path).st_ino)
            except OSError as e:
                rec["d_ino_is_st_ino"] = f"error {errno.errorcode.get(e.errno, e.errno)}"


def inode_numbers(root: str) -> dict:
    """relpath -> st_ino of every entry: what must not change across a
    remount of the same filesystem."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


class Leeway:
    """The accepted differences that depend on what happened before.

    Kernel overlayfs copies the source of a rename up *before* it finds out
    that the rename fails (e.g. ENOTEMPTY for a non-empty target directory),
    and that failed copy-up leaves the source's parent directory with a fresh
    mtime. A filesystem that checks first and changes nothing on failure is
    right, so after a rename failed identically on both sides, the parent
    directories involved may show kernel="now" against an explicit time on
    the target -- only that combination, only those paths."""

    def __init__(self):
        self.stale_parent_mtime: set = set()

    def note(self, op: tuple, rk, rt) -> None:
        if op[0] in ("rename", "rename_noreplace", "exchange") and rk[0] == "err" and rk == rt:
            for p in op[1:3]:
                self.stale_parent_mtime.add(os.path.dirname(p))

    def excuses(self, path: str, field: str, kernel, target) -> bool:
        return (field == "mtime" and kernel == "now" and isinstance(target, int)
                and path in self.stale_parent_mtime)

    def same_result(self, op: tuple, rk, rt) -> bool:
        if rk == rt:
            return True
        if op[0] != "stat" or rk[0] != "ok" or rt[0] != "ok":
            return False
        a, b = rk[1], rt[1]
        return (set(a) == set(b)
                and all(a[k] == b[k] or self.excuses(op[1], k, a[k], b[k]) for k in a))


class KernelOnTargetLeeway(Leeway):
    """Kernel overlayfs reading the target's upper (fidelity variant): a
    lower hard link some of whose names the merged view hid when it was
    copied up counts those names in st_nlink on both live mounts; the target
    records them in its own xattr, which kernel overlayfs does not read (it
    keeps that count in its index), so there the count is lower."""

    def __init__(self, base: Leeway):
        super().__init__()
        self.stale_parent_mtime = base.stale_parent_mtime

    def excuses(self, path: str, field: str, kernel, target) -> bool:
        return (super().excuses(path, field, kernel, target)
                or (field == "nlink" and isinstance(target, int) and 1 <= target < kernel))


def diff_trees(ref: dict, got: dict, leeway: Leeway | None = None, limit: int = 25) -> list:
    out = []
    leeway = leeway or Leeway()
    for path in sorted(set(ref) | set(got)):
        a, b = ref.get(path), got.get(path)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"/{path}: kernel={a} target={b}")
        else:
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k) and not leeway.excuses(path, k, a.get(k), b.get(k)):
                    out.append(f"/{path}: {k}: kernel={a.get(k)!r} target={b.get(k)!r}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


# --- operation generation -------------------------------------------------------

def scan(root: str) -> dict:
    """relpath -> file type letter of every visible entry (root excluded)."""
    out = {}

    def visit(rel: str) -> None:
        with os.scandir(_p(root, rel)) as it:
            for de in it:
                path = f"{rel}/{de.name}" if rel else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue     # listed but not there: the snapshot reports it
                out[path] = _TYPES.get(stat.S_IFMT(st.st_mode), "?")
                if stat.S_ISDIR(st.st_mode):
                    visit(path)

    visit("")
    return out


OP_WEIGHTS = {
    "create": 10, "write": 6, "append": 4, "rdwr": 3, "truncate": 4, "otrunc": 2,
    "read": 8, "stat": 8, "listdir": 6, "unlink": 6, "rmdir": 5, "mkdir": 6,
    "mkfifo": 2, "rename": 12, "symlink": 4, "readlink": 3, "link": 5, "chmod": 4,
    "chown": 3, "utime": 5, "setxattr": 5, "getxattr": 3, "listxattr": 3,
    "removexattr": 3,
    # renameat2 flags: libfuse 2's protocol cannot carry them (EINVAL there).
    "rename_noreplace": 0 if os.environ.get("UNIONFS_LIBFUSE") == "2" else 3,
    "exchange": 0 if os.environ.get("UNIONFS_LIBFUSE") == "2" else 5,
}
_OP_NAMES = sorted(OP_WEIGHTS)
_OP_CUM = [OP_WEIGHTS[n] for n in _OP_NAMES]
#: Operations that open the path: never aimed at a device node, because
#: opening one drives the host's device (both mounts allow devices as root).
_OPENING = {"create", "write", "append", "rdwr", "otrunc", "read", "truncate"}


class OpGen:
    def __init__(self, rng: random.Random, stack: Stack):
        self.rng = rng
        # Every path any layer mentions, hidden or not: aiming at whited-out
        # and shadowed names is half the point.
        self.pool = sorted(set().union(stack.upper, *stack.lowers))

    def _new_path(self, entries: dict) -> str:
        rng = self.rng
        dirs = [""] + [p for p, t in entries.items() if t == "dir"]
        links = [p for p, t in entries.items() if t == "symlink"]
        if links and rng.random() < 0.1:
            parent = rng.choice(links)        # create through a symlink
        else:
            parent = rng.choice(dirs)
        name = rng.choice(NEW_NAMES)
        return f"{parent}/{name}" if parent else name

    def _existing(self, entries: dict, kinds=None, root_ok=False) -> str:
        rng = self.rng
        if root_ok and rng.random() < 0.05:
            return ""
        cands = [p for p, t in entries.items() if kinds is None or t in kinds]
        roll = rng.random()
        if not cands or roll < 0.08:
            return rng.choice(self.pool)
        if roll < 0.12:
            return self._new_path(entries)
        return rng.choice(cands)

    def next(self, kernel_root: str) -> tuple:
        rng = self.rng
        entries = scan(kernel_root)
        self.root = kernel_root
        while True:
            name = rng.choices(_OP_NAMES, weights=_OP_CUM)[0]
            op = self._make(name, entries)
            if name in _OPENING:
                try:
                    st = os.stat(_p(kernel_root, op[1]))
                    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                        continue
                except OSError:
                    pass
            return op

    def _make(self, name: str, entries: dict) -> tuple:
        rng = self.rng
        files = ("file", "symlink")
        follow = rng.random() < 0.6
        if name == "create":
            flags = ["O_WRONLY" if rng.random() < 0.7 else "O_RDWR", "O_CREAT"]
            for f, p in (("O_EXCL", 0.25), ("O_TRUNC", 0.4), ("O_APPEND", 0.15)):
                if rng.random() < p:
                    flags.append(f)
            path = self._new_path(entries) if rng.random() < 0.6 else self._existing(entries, files)
            return ("create", path, tuple(flags), rng.choice(FILE_MODES[:4]), _text(rng, 0, 20))
        if name in ("write", "rdwr"):
            return (name, self._existing(entries, files), rng.randint(0, 40), _text(rng, 1, 16))
        if name == "append":
            return ("append", self._existing(entries, files), _text(rng, 1, 16))
        if name == "truncate":
            return ("truncate", self._existing(entries, files), rng.randint(0, 40))
        if name in ("otrunc", "read"):
            return (name, self._existing(entries, files))
        if name == "stat":
            return ("stat", self._existing(entries, root_ok=True), follow)
        if name == "listdir":
            return ("listdir", self._existing(entries, ("dir", "symlink"), root_ok=True))
        if name == "unlink":
            return ("unlink", self._existing(entries, ("file", "symlink", "fifo", "chardev")))
        if name == "rmdir":
            empty = [p for p, t in entries.items()
                     if t == "dir" and not os.listdir(_p(self.root, p))]
            if empty and rng.random() < 0.5:
                return ("rmdir", rng.choice(empty))
            return ("rmdir", self._existing(entries, ("dir",)))
        if name == "mkdir":
            return ("mkdir", self._new_path(entries), rng.choice(DIR_MODES))
        if name == "mkfifo":
            return ("mkfifo", self._new_path(entries), 0o644)
        if name == "rename":
            src = self._existing(entries)
            dst = self._existing(entries) if rng.random() < 0.35 else self._new_path(entries)
            return ("rename", src, dst)
        if name == "rename_noreplace":
            src = self._existing(entries)
            dst = self._existing(entries) if rng.random() < 0.5 else self._new_path(entries)
            return ("rename_noreplace", src, dst)
        if name == "exchange":
            a = self._existing(entries)
            b = self._existing(entries) if rng.random() < 0.9 else self._new_path(entries)
            return ("exchange", a, b)
        if name == "symlink":
            path = self._new_path(entries)
            return ("symlink", _gen_target(rng, path), path)
        if name == "readlink":
            return ("readlink", self._existing(entries, ("symlink",)))
        if name == "link":
            return ("link", self._existing(entries, ("file", "symlink", "fifo")),
                    self._new_path(entries), follow)
        if name == "chmod":
            return ("chmod", self._existing(entries, root_ok=True),
                    rng.choice(FILE_MODES + DIR_MODES))
        if name == "chown":
            uid, gid = rng.choice(OWNERS)
            return ("chown", self._existing(entries, root_ok=True), uid, gid, follow)
        if name == "utime":
            ns = None if rng.random() < 0.2 else (_gen_time(rng), _gen_time(rng))
            return ("utime", self._existing(entries, root_ok=True), ns, follow)
        path = self._existing(entries, root_ok=True)
        xname = rng.choice(XATTR_NAMES)
        try:    # mostly aim at a name the entry has
            have = [n for n in os.listxattr(_p(self.root, path), follow_symlinks=follow)
                    if n.startswith("user.")]
        except OSError:
            have = []
        if have and rng.random() < 0.7:
            xname = rng.choice(sorted(have))
        if name == "setxattr":
            flags = rng.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
            return ("setxattr", path, xname, _text(rng, 0, 10), flags, follow)
        if name == "getxattr":
            return ("getxattr", path, xname, follow)
        if name == "listxattr":
            return ("listxattr", path, follow)
        if name == "removexattr":
            return ("removexattr", path, xname, follow)
        raise AssertionError(name)


# --- one sequence ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    whiteout: str      # what the target writes: overlay | oci
    lower_fmt: str     # target copy's format: overlay | mixed
    # Kernel overlayfs with index=on,metacopy=on against the target with
    # metacopy=on, over lowers that also hold hard links.
    fidelity: bool = False

    @property
    def kernel_recheck(self) -> bool:
        """Kernel overlayfs can read the target's layers afterwards only if
        they hold no OCI markers at all."""
        return self.whiteout == "overlay" and self.lower_fmt == "overlay"

    def __str__(self) -> str:
        return (f"whiteout={self.whiteout},layers={self.lower_fmt}"
                + (",index=on,metacopy=on" if self.fidelity else ""))

    @property
    def target_options(self) -> str:
        return "metacopy=on" if self.fidelity else ""


VARIANTS = (Variant("overlay", "overlay"), Variant("overlay", "mixed"), Variant("oci", "mixed"),
            Variant("overlay", "overlay", fidelity=True))


def add_hard_links(stack: Stack, rng: random.Random) -> None:
    """Give some regular files of the lower layers a second name in the same
    layer (a new name beside a file, where that layer has none)."""
    for layer in stack.lowers:
        files = [p for p, e in sorted(layer.items()) if e.kind == "file"]
        for path in rng.sample(files, min(2, len(files))):
            parent = os.path.dirname(path)
            free = [n for n in ("n", "m") if os.path.join(parent, n) not in layer]
            if free:
                layer[os.path.join(parent, free[0])] = Entry("hardlink", target=path)


@dataclasses.dataclass
class Stats:
    sequences: int = 0
    operations: int = 0
    remount_checks: int = 0
    kernel_on_upper_checks: int = 0
    errno_results: int = 0
    by_op: dict = dataclasses.field(default_factory=dict)   # name -> [ok, errno]

    def count(self, op: tuple, result: tuple) -> None:
        self.operations += 1
        self.errno_results += result[0] == "err"
        self.by_op.setdefault(op[0], [0, 0])[result[0] == "err"] += 1

    def line(self, target: str) -> str:
        per_op = " ".join(f"{n}={ok}/{err}" for n, (ok, err) in sorted(self.by_op.items()))
        return (f"differential vs kernel overlayfs: target={target} "
                f"sequences={self.sequences} operations={self.operations} "
                f"(of which {self.errno_results} returned an errno) "
                f"remount_checks={self.remount_checks} "
                f"kernel_on_target_upper_checks={self.kernel_on_upper_checks}\n"
                f"  per operation, ok/errno: {per_op}")


def variant_for(seed: int) -> Variant:
    return VARIANTS[seed % len(VARIANTS)]


def run_sequence(seed: int, workroot: str, target: FuseTarget, nops: int | None = None,
                 ops: list | None = None, stats: Stats | None = None) -> list:
    """Run one sequence; return the executed [(op, result)]; raise Divergence.

    With `ops`, replay exactly those operations on the tree of `seed`."""
    rng = random.Random(seed)
    variant = variant_for(seed)
    stack = gen_stack(rng)
    if variant.fidelity:
        add_hard_links(stack, random.Random(seed * 7919))
    if nops is None:
        nops = rng.randint(20, 40)
    base = os.path.join(workroot, f"seq{seed}")
    kern = Side(os.path.join(base, "k"), len(stack.lowers))
    tgt = Side(os.path.join(base, "t"), len(stack.lowers))
    kern.build(stack, "overlay")
    tgt.build(stack, variant.lower_fmt)
    kernel = KernelOverlay(variant.fidelity)
    executed: list = []
    kmnt, tmnt = kern.mountpoint(), tgt.mountpoint()
    hung = threading.Event()

    def watchdog():
        hung.set()
        target.kill_daemon(tmnt)

    timer = threading.Timer(SEQUENCE_WATCHDOG_S, watchdog)
    timer.daemon = True
    try:
        with ExitStack() as cleanup:
            timer.start()
            cleanup.callback(timer.cancel)
            kernel.mount(kern.lowers, kern.upper, kern.workdir(), kmnt)
            cleanup.callback(kernel.umount, kmnt)
            target.mount(tgt.lowers, tgt.upper, tgt.workdir(), tmnt, variant.whiteout,
                         variant.target_options)
            cleanup.callback(target.umount, tmnt)

            gen = OpGen(rng, stack) if ops is None else None
            leeway = Leeway()
            for i in range(nops if ops is None else len(ops)):
                op = gen.next(kmnt) if gen else ops[i]
                rk = apply_op(kmnt, op)
                rt = apply_op(tmnt, op)
                executed.append((op, rk, rt))
                leeway.note(op, rk, rt)
                if stats:
                    stats.count(op, rk)
                if not leeway.same_result(op, rk, rt):
                    raise Divergence(f"op #{i}", f"{format_op(op)}: kernel={rk!r} "
                                     f"{target.name}={rt!r}", executed)

            ref = snapshot(kmnt, d_ino=variant.fidelity)
            _compare(ref, snapshot(tmnt, d_ino=variant.fidelity), "final tree", executed, leeway)
            if target.kind == "unionfs" and d_ino_mismatches(tmnt):
                raise Divergence("d_ino", f"readdir's d_ino is not st_ino for "
                                 f"{d_ino_mismatches(tmnt)[:10]}", executed)
            inos = inode_numbers(tmnt)

            target.umount_checked(tmnt)
            target.mount(tgt.lowers, tgt.upper, tgt.workdir(), tmnt, variant.whiteout,
                         variant.target_options)
            _compare(ref, snapshot(tmnt, d_ino=variant.fidelity), "tree after remount",
                     executed, leeway)
            if target.kind == "unionfs" and inode_numbers(tmnt) != inos:
                after = inode_numbers(tmnt)
                changed = sorted(p for p in inos if after.get(p) != inos[p])
                raise Divergence("inode numbers after remount",
                                 f"changed for {changed[:10]}", executed)
            force_unmount(tmnt)     # the user's command was checked above
            if stats:
                stats.remount_checks += 1

            if variant.kernel_recheck:
                rmnt = tgt.mountpoint("mnt2")
                kernel.mount(tgt.lowers, tgt.upper, tgt.workdir("work2"), rmnt)
                cleanup.callback(kernel.umount, rmnt)
                _compare(ref, snapshot(rmnt, d_ino=variant.fidelity),
                         "kernel overlayfs on the target's lower+upper",
                         executed, KernelOnTargetLeeway(leeway) if variant.fidelity else leeway)
                if stats:
                    stats.kernel_on_upper_checks += 1
    finally:
        timer.cancel()
        left = mounts_under(base)
        if left:
            raise RuntimeError(f"mounts left behind, not removing {base}: {left}")
        shutil.rmtree(base, ignore_errors=True)
        if hung.is_set():     # whatever was raised meanwhile came from the kill
            raise RuntimeError(f"seed {seed}: the sequence hung for {SEQUENCE_WATCHDOG_S}s; "
                               f"{target.name}'s daemon was killed")
    if stats:
        stats.sequences += 1
    return executed


def _compare(ref: dict, got: dict, stage: str, executed: list, leeway: Leeway) -> None:
    diff = diff_trees(ref, got, leeway)
    if diff:
        raise Divergence(stage, "\n    " + "\n    ".join(diff), executed)


# --- shrinking and reporting ----------------------------------------------------

def shrink(seed: int, workroot: str, target: FuseTarget, ops: list,
           budget_s: float = 120.0) -> tuple:
    """Delta-debug `ops` (the operations of a diverging sequence of `seed`)
    down to a short list that still diverges. Returns (ops, Divergence)."""
    deadline = time.monotonic() + budget_s
    last: Divergence | None = None

    def diverges(candidate: list) -> bool:
        nonlocal last
        try:
            run_sequence(seed, workroot, target, ops=candidate)
        except Divergence as d:
            last = d
            return True
        except RuntimeError:    # a hang or a failed mount: not this divergence
            return False
        return False

    if not diverges(ops):
        return ops, None
    n = 2
    while len(ops) >= 2 and time.monotonic() < deadline:
        chunk = -(-len(ops) // n)
        for start in range(0, len(ops), chunk):
            candidate = ops[:start] + ops[start + chunk:]
            if time.monotonic() >= deadline:
                break
            if diverges(candidate):
                ops = candidate
                n = max(n - 1, 2)
                break
        else:
            if n >= len(ops):
                break
            n = min(2 * n, len(ops))
    diverges(ops)     # leave `last` describing the final list
    return ops, last


def report(seed: int, target: FuseTarget, d: Divergence, shrunk: tuple | None) -> str:
    rng = random.Random(seed)
    stack = gen_stack(rng)
    lines = [f"DIVERGENCE seed={seed} target={target.name} variant={variant_for(seed)}",
             f"  at {d.stage}: {d.detail}",
             "  layer stack (kernel copy = overlay format; '(oci)' = OCI marker in "
             "the target copy when layers=mixed):",
             stack.describe(),
             "  executed operations (kernel result / target result):"]
    for i, (op, rk, rt) in enumerate(d.executed):
        mark = "" if rk == rt else "   <-- differs"
        lines.append(f"    {i:2d} {format_op(op)} -> {rk!r} / {rt!r}{mark}")
    if shrunk:
        ops, last = shrunk
        lines.append(f"  shrunk to {len(ops)} operation(s):")
        lines += [f"    {format_op(op)}" for op in ops]
        if last is not None:
            lines.append(f"  which diverges at {last.stage}: {last.detail}")
    lines.append(f"  replay: DIFFTEST_SEED={seed} DIFFTEST_COUNT=1 pytest -s "
                 "tests/test_differential.py")
    return "\n".join(lines)
