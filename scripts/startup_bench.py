#!/usr/bin/env python3
"""How long a mount program takes to start: until its command returns
("returned": what a container engine waits for) and until a stat of the
mount's root has been answered ("live": the daemon has taken INIT and
answered GETATTR), median of N runs; and ``podman run --rm IMAGE true`` with
each program as podman's ``mount_program``.

    .venv/bin/python scripts/startup_bench.py                      # mount rows
    .venv/bin/python scripts/startup_bench.py --podman 10          # and podman
    .venv/bin/python scripts/startup_bench.py \\
        --system base=/tmp/base-venv/bin/fuse-unionfs --system fuse-overlayfs

A system is LABEL=PROGRAM, or a program name: a ``fuse-unionfs``-style
program (``PROG -o OPTS MNT``) or ``unionfs`` (``unionfs mount -o OPTS MNT``,
``unionfs umount MNT``). Default: this venv's fuse-unionfs and unionfs, and
fuse-overlayfs. Systems alternate within each round (their order rotates),
all on the same three lowers, each run with a fresh upper and work dir.

Root only (the mounts are made by mount(2), as podman's are). The podman
rows run in a private mount namespace with private podman storage under
/tmp (tests/podman_helpers.PodmanSandbox); the host's podman storage is
never read or written. Every mount made is unmounted.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 60


def parse_system(text):
    label, eq, program = text.partition("=")
    if not eq:
        program = text
        label = os.path.basename(text)
    path = program if os.sep in program else (
        str(VENV_BIN / program) if (VENV_BIN / program).exists() else shutil.which(program))
    if path is None:
        sys.exit(f"startup_bench: {program}: not found")
    return label, os.path.abspath(path)


def make_lowers(base):
    lowers = []
    for i in range(3):
        d = base / f"lower{i}"
        for j in range(20):
            (d / f"dir{j}").mkdir(parents=True)
            (d / f"dir{j}" / f"file{i}").write_text("x" * 100)
        lowers.append(d)
    return lowers


def mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def mount_argv(program, opts, mnt):
    if os.path.basename(program) == "unionfs":
        return [program, "mount", "-o", opts, str(mnt)]
    return [program, "-o", opts, str(mnt)]


def unmount(program, mnt):
    if os.path.basename(program) in ("unionfs", "fuse-unionfs"):
        # waits for the daemon to exit, so it does not load the next run
        cmd = [str(Path(program).with_name("unionfs")), "umount", str(mnt)]
    else:
        cmd = ["umount", str(mnt)]
    r = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT)
    if r.returncode != 0 and mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=TIMEOUT)
    if os.path.basename(program) not in ("unionfs", "fuse-unionfs"):
        time.sleep(0.05)            # fuse-overlayfs exits right after the unmount


def one_mount(program, lowers, run_dir):
    """(returned, live, cpu) seconds of one mount on a fresh upper: cpu is
    the mount command's own (user + system; not the daemon it leaves)."""
    upper, work, mnt = run_dir / "upper", run_dir / "work", run_dir / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    argv = mount_argv(program, opts, mnt)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        t1 = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {stderr}")
        os.stat(mnt)
        t2 = time.perf_counter()
        if not os.path.isfile(mnt / "dir3" / "file2"):
            raise RuntimeError(f"{program}: the mount does not show the lowers")
    finally:
        if mounted(mnt):
            unmount(program, mnt)
    return t1 - t0, t2 - t0, usage.ru_utime + usage.ru_stime


def bench_mounts(systems, runs, scratch):
    lowers = make_lowers(scratch / "lowers")
    times = {label: ([], [], []) for label, _ in systems}
    for label, program in systems:            # one untimed run each: caches
        one_mount(program, lowers, scratch / f"warm-{label}")
    for i in range(runs):
        order = systems[i % len(systems):] + systems[:i % len(systems)]
        for label, program in order:
            for series, value in zip(times[label], one_mount(program, lowers,
                                                               scratch / f"run-{label}-{i}")):
                series.append(value)
    print(f"mount until the command returned / until a stat of the root answered; "
          f"the command's CPU time (median of {runs}, ms):")
    for label, (returned, live, cpu) in times.items():
        print(f"  {label:24} returned {1000 * statistics.median(returned):6.1f}"
              f"   live {1000 * statistics.median(live):6.1f}"
              f"   cpu {1000 * statistics.median(cpu):5.1f}"
              f"   (live min {1000 * min(live):.1f} max {1000 * max(live):.1f})")


def bench_podman(systems, runs, scratch):
    sys.path.insert(0, str(HERE.parent / "tests"))
    from podman_helpers import PodmanSandbox, busybox_rootfs_tar
    image = "localhost/startup-bench:latest"
    rootfs = busybox_rootfs_tar(scratch, {"data/x": "x"})
    programs = [(label, program) for label, program in systems
                if os.path.basename(program) != "unionfs"] + [("kernel overlay", None)]
    sandboxes, times = {}, {label: [] for label, _ in programs}
    try:
        for label, program in programs:
            sandboxes[label] = sandbox = PodmanSandbox(program)
            sandbox.run("import", "--quiet", str(rootfs), image)
            sandbox.run("run", "--rm", image, "true")       # warm caches
        for i in range(runs):
            order = programs[i % len(programs):] + programs[:i % len(programs)]
            for label, _ in order:
                t0 = time.perf_counter()
                sandboxes[label].run("run", "--rm", image, "true")
                times[label].append(time.perf_counter() - t0)
    finally:
        complaints = [c for s in sandboxes.values() for c in s.close()]
    print(f"podman run --rm IMAGE true (median of {runs}, s):")
    for label, t in times.items():
        print(f"  {label:24} {statistics.median(t):.3f}   (min {min(t):.3f} max {max(t):.3f})")
    if complaints:
        sys.exit("startup_bench: " + "\n".join(complaints))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", action="append", metavar="[LABEL=]PROGRAM",
                   help="a mount program to measure (repeatable)")
    p.add_argument("--runs", type=int, default=20, help="mounts per system (default 20)")
    p.add_argument("--podman", type=int, default=0, metavar="N",
                   help="also N rounds of podman run --rm IMAGE true")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("startup_bench: needs root (mount(2), podman storage)")
    if "STARTUP_BENCH_PRIVATE" not in os.environ:
        # Our own mount namespace: nothing mounted here is seen (or left) outside.
        env = dict(os.environ, STARTUP_BENCH_PRIVATE="1")
        os.execvpe("unshare", ["unshare", "--mount", "--propagation", "private",
                               sys.executable, *sys.argv], env)
    systems = [parse_system(s) for s in args.system or
               ["fuse-unionfs", "unionfs", "fuse-overlayfs"]]
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        bench_mounts(systems, args.runs, Path(tmp))
        if args.podman:
            bench_podman(systems, args.podman, Path(tmp))


if __name__ == "__main__":
    main()
