"""A test image with a shell (static busybox) and users, and a throw-away
store whose containers are always removed: what the `run` tests share.

`Engine.close()` runs `rm -f` on every container, then unmounts whatever is
still mounted below the store, deletes what the runtime still has, kills
processes still working for the store, and returns what it had to clean up
by force (a test asserts it is nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from image_helpers import D, F, L, config_for, docker_archive, layer_tar
from podman_helpers import processes_mentioning, wait_for_exit

BIN = Path(sys.executable).parent
UNIONFS = str(BIN / "unionfs")
BUSYBOX = "/bin/busybox"            # Debian busybox-static
TIMEOUT = 60                        # seconds any CLI call may take

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
          "bob:x:1001:100:Bob:/home/bob:/bin/sh\n")
GROUP = ("root:x:0:\n"
         "users:x:100:\n"
         "alice:x:1000:\n"
         "staff:x:50:alice\n"
         "audio:x:63:alice,bob\n")
IMAGE_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"]
IMAGE_CMD = ["sh", "-c", "echo $GREETING from $(pwd)"]
IMAGE_WORKDIR = "/app"
IMAGE_VOLUME = "/data"


def runtime_missing_reason() -> str | None:
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} (busybox-static) is missing"
    if shutil.which("runc") is None:
        return "runc is not installed"
    if os.geteuid() != 0:
        return "running containers needs root here (no rootless runc set-up)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def busybox_layer() -> bytes:
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
    entries = [D("bin"), F("bin/busybox", busybox, 0o755)]
    entries += [L(f"bin/{a}", "busybox") for a in applets if a != "busybox"]
    entries += [D("etc"), F("etc/passwd", PASSWD.encode()), F("etc/group", GROUP.encode()),
                D("tmp", 0o1777), D("root", 0o700), D("home"), D("home/alice", 0o755, 1000, 1000),
                D("app"), F("app/hello.txt", b"hello from the image\n"),
                D("data"), F("data/seed.txt", b"seeded by the image\n")]
    return layer_tar(*entries)


def write_test_image(path: Path, tag: str = "busy:1", extra_layers: tuple[bytes, ...] = ()) -> Path:
    """The busybox image (plus `extra_layers` on top) as a docker-archive."""
    tars = [busybox_layer(), *extra_layers]
    config = json.loads(config_for(tars))
    config["config"] = {"Env": IMAGE_ENV, "Cmd": IMAGE_CMD, "WorkingDir": IMAGE_WORKDIR,
                        "Volumes": {IMAGE_VOLUME: {}}}
    docker_archive(path, tars, tags=(tag,), config=json.dumps(config).encode())
    return path


def mounts_under(root: str) -> list[str]:
    root = os.path.realpath(root)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt.startswith(root + "/"):
                out.append(mnt)
    return out


class Engine:
    """`unionfs` with --store fixed, on a store of its own."""

    def __init__(self, store: Path):
        self.store = str(store)

    def __call__(self, *args, check=True, timeout=TIMEOUT, input=None, **kw) -> subprocess.CompletedProcess:
        n = 2 if args[0] == "image" else 1          # `image load`: --store after both words
        cmd, rest = args[:n], args[n:]
        r = subprocess.run([UNIONFS, *cmd, "--store", self.store, *map(str, rest)], capture_output=True,
                           text=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"unionfs {' '.join(map(str, args))} -> {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def runtime_ids(self) -> list[str]:
        root = os.path.join(self.store, "runtime", "runc")
        r = subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True, text=True,
                           timeout=TIMEOUT)
        return r.stdout.split()

    def containers(self) -> list[str]:
        d = os.path.join(self.store, "containers")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def close(self) -> list[str]:
        """Remove every container; return what was left that rm -f missed."""
        for name in self.containers():
            try:
                self("rm", "-f", name, check=False)
            except subprocess.TimeoutExpired:
                pass
        leftovers = [f"mount {m}" for m in mounts_under(self.store)]
        leftovers += [f"runtime {i}" for i in self.runtime_ids()]
        # Monitors and unionfs daemons are forks of `unionfs ... --store STORE`;
        # the last ones may still be finishing their clean-up.
        stray = wait_for_exit(processes_mentioning(self.store), 10)
        leftovers += [f"process {pid}" for pid in stray]
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for i in self.runtime_ids():
            subprocess.run(["runc", "--root", os.path.join(self.store, "runtime", "runc"), "delete", "-f", i],
                           capture_output=True, timeout=TIMEOUT)
        for m in sorted(mounts_under(self.store), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=TIMEOUT)
        return leftovers
