#!/usr/bin/env python3
"""`make demo`: unionfs on the sample shipped in demo/, end to end.

Part 1 mounts two plain directories under a fresh upper and shows a copy-up,
a whiteout and an opaque directory. Part 2 builds the demo image, loads it
into a temporary store, mounts it as a container rootfs, shows which layer
files come from, changes it, shows the copy-on-write events, and diff,
commit and save. Part 3 (as root, with runc) runs the image as a
container, changes it and commits it while it runs, saves it, loads it into
a fresh store and runs it there. Everything lives in a temporary directory that
is unmounted and removed at the end, whatever happens.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNIONFS = str(BIN / "unionfs")


def say(text):
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def sh(*cmd, check=True, show=True):
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(UNIONFS, "unionfs")
    if show:
        print(f"$ {shown}", flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    out = (r.stdout + r.stderr).rstrip()
    if out and show:
        print(out, flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: step failed: {shown}")
    return r


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def part1(tmp):
    say("Part 1: a union of two directories (demo/base under demo/change)")
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, mnt):
        d.mkdir()
    lower = f"{REPO}/demo/change:{REPO}/demo/base"
    sh(UNIONFS, "mount", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt)
    try:
        sh("ls", "-l", mnt / "app", mnt / "etc")
        say("copy-up: appending to a lower file copies it into the upper first")
        sh("sh", "-c", f"echo 'edited in the container' >> {mnt}/etc/motd")
        sh("cat", mnt / "etc/motd")
        sh("diff", "-u", REPO / "demo/change/etc/motd", upper / "etc/motd", check=False)
        say("whiteout: deleting a lower file records a whiteout in the upper")
        sh("rm", mnt / "app/config.ini")
        sh("ls", "-la", mnt / "app", upper / "app")
        say("opaque: a directory removed and made again hides what was below")
        sh("rm", "-r", mnt / "app/data")
        sh("mkdir", mnt / "app/data")
        sh("ls", "-la", mnt / "app/data")
        sh("getfattr", "-d", "-m", "overlay", upper / "app/data", check=False)
        say("the lower layers did not change")
        sh("ls", REPO / "demo/base/app", REPO / "demo/base/app/data")
    finally:
        if mounted(mnt):
            sh(UNIONFS, "umount", mnt)


def part2(tmp):
    say("Part 2: an image as a container rootfs (load, mount, diff, commit, save)")
    store, mnt = tmp / "store", tmp / "rootfs"
    mnt.mkdir()
    archive = tmp / "demo.tar"
    st = ["--store", store]
    sh(sys.executable, REPO / "scripts/make_demo_image.py", "-o", archive)
    sh(UNIONFS, "image", "load", *st, "-q", archive)
    sh(UNIONFS, "image", "ls", *st)
    sh(UNIONFS, "image", "history", *st, "unionfs-demo")
    sh(UNIONFS, "image", "mount", *st, "unionfs-demo", mnt, "--name", "demo")
    try:
        sh("ls", "-l", mnt, mnt / "app")
        sh("cat", mnt / "etc/motd")
        if os.geteuid() == 0:
            say("the rootfs runs its own busybox (chroot)")
            sh("chroot", mnt, "/bin/sh", "-c", "echo hello from $(cat /etc/hostname); ls /app")
        say("which layer each file comes from (its diff_id and the step that made it)")
        sh(UNIONFS, "which", mnt / "etc/motd", mnt / "app/VERSION", mnt / "app/data")
        say("a change in the container")
        sh("sh", "-c", f"echo 2.0 > {mnt}/app/VERSION; echo edited >> {mnt}/etc/motd; "
                       f"rm {mnt}/app/README; "
                       f"mkdir -p {mnt}/srv && echo served > {mnt}/srv/index.html")
        say("what copy-on-write did: events (by container name), and which again")
        sh(UNIONFS, "events", *st, "demo")
        sh(UNIONFS, "which", mnt / "app/VERSION", mnt / "srv/index.html")
        sh(UNIONFS, "diff", *st, "demo")
        sh(UNIONFS, "commit", *st, "demo", "unionfs-demo:changed", "-m", "make demo: edit")
        sh(UNIONFS, "image", "history", *st, "unionfs-demo:changed")
        sh(UNIONFS, "image", "save", *st, "-q", "unionfs-demo:changed", "-o", tmp / "changed.tar")
        sh("tar", "-tf", tmp / "changed.tar")
    finally:
        if mounted(mnt):
            sh(UNIONFS, "umount", mnt)
    sh(UNIONFS, "ps", *st, "-a")
    sh(UNIONFS, "rm", *st, "demo")


def part3(tmp):
    say("Part 3: run the image (runc), change it while it runs, commit, move it to another store, run it there")
    if os.geteuid() != 0 or not shutil.which("runc"):
        say("skipped: running containers needs root and runc here")
        return
    store, other = tmp / "run-store", tmp / "other-store"
    st, ot = ["--store", store], ["--store", other]
    sh(UNIONFS, "image", "load", *st, "-q", tmp / "demo.tar")
    sh(UNIONFS, "run", *st, "--rm", "unionfs-demo", "sh", "-c", "echo pid $$ in $(pwd) as $(busybox id -u); cat /app/VERSION")
    sh(UNIONFS, "run", *st, "-d", "--name", "web", "unionfs-demo",
       "sh", "-c", "echo serving; exec busybox sleep 1000")
    try:
        sh(UNIONFS, "ps", *st)
        sh(UNIONFS, "logs", *st, "web")
        say("change the running container, and commit it while it runs (paused meanwhile)")
        sh(UNIONFS, "exec", *st, "web", "sh", "-c", "echo 3.0 > /app/VERSION")
        sh(UNIONFS, "diff", *st, "web")
        sh(UNIONFS, "commit", *st, "-q", "-c", 'CMD ["cat", "/app/VERSION"]', "web", "web:v2")
        sh(UNIONFS, "ps", *st)
        sh(UNIONFS, "image", "save", *st, "-q", "web:v2", "-o", tmp / "web.tar")
        say('"another machine": a fresh store loads the archive and runs it')
        sh(UNIONFS, "image", "load", *ot, "-q", tmp / "web.tar")
        sh(UNIONFS, "run", *ot, "--rm", "web:v2")
        sh(UNIONFS, "stop", *st, "-t", "1", "web")
        sh(UNIONFS, "ps", *st, "-a")
    finally:
        sh(UNIONFS, "rm", *st, "-f", "web", check=False)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="unionfs-demo-"))
    try:
        part1(tmp)
        part2(tmp)
        part3(tmp)
        say("done: everything was unmounted; the temporary files go now")
        return 0
    finally:
        for m in (tmp / "merged", tmp / "rootfs"):
            if mounted(m):
                subprocess.run([UNIONFS, "umount", str(m)], timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
