"""Resources: no descriptor or memory growth over many cycles, the daemon
exits on unmount, and a mount whose daemon was killed is reported as such
by ``unionfs umount`` (one line, no hang).
"""

import errno
import os
import subprocess

import pytest

from conftest import UNIONFS, is_mounted, requires_fuse, run, wait_for
from reliability_helpers import (PY, alive, assert_reports_dead_daemon, daemon_pid,
                                 kill_daemon, mount_cli, umount_dead,
                                 unmount_layers_after)  # noqa: F401

pytestmark = [requires_fuse, pytest.mark.fuse]


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# Runs in a client process: `cycles` rounds of the operations a busy
# container makes, including failing ones (error paths must not leak).
CYCLES = r"""
import errno, os, sys
mnt, cycles = sys.argv[1], int(sys.argv[2])
for i in range(cycles):
    if i % 2:
        fd = os.open(f"{mnt}/lower/f{i % 50}", os.O_RDONLY); os.read(fd, 64); os.close(fd)
        os.stat(f"{mnt}/lower/f{(i * 7) % 50}")
    else:
        fd = os.open(f"{mnt}/up", os.O_WRONLY | os.O_APPEND); os.write(fd, b"xx"); os.close(fd)
        os.lstat(f"{mnt}/up")
    if i % 4 == 0:
        for bad in (f"{mnt}/missing{i % 10}", f"{mnt}/lower/f0/notadir"):
            try:
                os.open(bad, os.O_RDONLY)
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.ENOTDIR), e
        try:
            os.open(f"{mnt}/up", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
    if i % 50 == 0:
        p = f"{mnt}/tmp{i}"
        with open(p, "w") as f:
            f.write("t")
        os.rename(p, p + ".r")
        os.unlink(p + ".r")
        os.listdir(f"{mnt}/lower")
        fd = os.open(f"{mnt}/lower/f{i % 50}", os.O_RDONLY)
        os.unlink(f"{mnt}/lower/f{i % 50}")         # whiteout while open
        os.close(fd)
        with open(f"{mnt}/lower/f{i % 50}", "w") as f:
            f.write("again")
"""


def _cycles(layers, record_property, total, step):
    lower = layers.lowers[0]
    (lower / "lower").mkdir()
    for i in range(50):
        (lower / "lower" / f"f{i}").write_text(f"lower {i}\n")
    mnt = mount_cli(layers)
    (mnt / "up").write_text("")
    pid = daemon_pid(mnt)

    def go(n):
        r = subprocess.run([PY, "-c", CYCLES, str(mnt), str(n)], capture_output=True,
                           text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]

    go(step)                                 # warm-up: caches, threads
    fds0, rss0 = fd_count(pid), rss_kib(pid)
    samples = []
    for _ in range(total // step):
        go(step)
        samples.append((fd_count(pid), rss_kib(pid)))
    fds1, rss1 = samples[-1]
    line = (f"resources: {total} cycles (open/close + stat each, ~{total * 5} requests), daemon fds {fds0} -> {fds1}, "
            f"RSS {rss0} KiB -> {rss1} KiB (samples {[s[1] for s in samples]})")
    print("\n" + line)
    record_property("resources", line)
    assert fds1 == fds0, f"file descriptors grew: {fds0} -> {fds1}"
    assert os.stat(mnt / "up").st_size == total + step
    # Memory: bounded, not growing with the number of cycles. The last half
    # of the samples may not grow beyond noise once the first half is done.
    half = samples[len(samples) // 2][1]
    assert rss1 - rss0 < 32 * 1024, f"RSS grew by {rss1 - rss0} KiB"
    assert rss1 - half < 8 * 1024, f"RSS still growing: {half} -> {rss1} KiB"
    assert run([UNIONFS, "umount", str(mnt)]).returncode == 0


@pytest.mark.timeout(300)
def test_no_fd_or_memory_growth(layers, record_property):
    _cycles(layers, record_property, 20000, 2500)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_no_fd_or_memory_growth_long(layers, record_property):
    _cycles(layers, record_property, 100000, 10000)


def test_daemon_exits_on_unmount(layers):
    (layers.lowers[0] / "f").write_text("f\n")
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    with open(mnt / "f", "a") as f:
        f.write("x")
    r = run([UNIONFS, "umount", str(mnt)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    # `unionfs umount` waits for the daemon: it has exited when it returns.
    assert not alive(pid), "daemon still running after unionfs umount returned"
    assert work_is_empty(layers)


def work_is_empty(layers):
    return os.listdir(layers.work / "unionfs-work") == []


def test_busy_mount_is_reported_and_stays_usable(layers):
    (layers.lowers[0] / "d").mkdir()
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    holder = subprocess.Popen([PY, "-c", "import sys,time; sys.stdin.read()"],
                              cwd=mnt / "d", stdin=subprocess.PIPE)
    try:
        r = run([UNIONFS, "umount", str(mnt)], timeout=60)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "busy" in lines[0], r.stderr
        assert is_mounted(mnt) and alive(pid)
        (mnt / "still").write_text("works\n")
    finally:
        holder.communicate(b"", timeout=30)
    r = run([UNIONFS, "umount", str(mnt)], timeout=60)
    assert r.returncode == 0, r.stderr


def _kill_and_check(mnt, pid):
    kill_daemon(mnt, pid)
    # Users of the dead mount get an error at once, not a hang.
    t = subprocess.run([PY, "-c", f"import os; os.listdir({str(mnt)!r})"],
                       capture_output=True, text=True, timeout=30)
    assert "Transport endpoint is not connected" in t.stderr, t.stderr


def test_killed_daemon_is_reported_by_umount(layers):
    (layers.lowers[0] / "f").write_text("f\n")
    mnt = mount_cli(layers)
    _kill_and_check(mnt, daemon_pid(mnt))
    assert_reports_dead_daemon(umount_dead(mnt), mnt)


def test_killed_daemon_is_reported_by_umount_uncached(layers):
    (layers.lowers[0] / "f").write_text("f\n")
    mnt = mount_cli(layers, "attr_timeout=0,entry_timeout=0")
    _kill_and_check(mnt, daemon_pid(mnt))
    assert_reports_dead_daemon(umount_dead(mnt), mnt)


def test_sigkill_during_busy_io_then_umount(layers):
    """Kill the daemon while clients are blocked inside requests: they all
    return (with an error), and the mount is removed without a hang."""
    (layers.lowers[0] / "big").write_bytes(os.urandom(1 << 20) * 32)
    mnt = mount_cli(layers)
    pid = daemon_pid(mnt)
    script = ("import os, sys\n"
              "p = sys.argv[1]\n"
              "try:\n"
              "    while True:\n"
              "        with open(p + '/big', 'ab') as f: f.write(b'x' * 65536)\n"
              "        os.listdir(p)\n"
              "except OSError as e:\n"
              "    print(e.errno)\n")
    clients = [subprocess.Popen([PY, "-c", script, str(mnt)], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    try:
        # Kill once the clients are busy: the upper copy has grown by 8 writes.
        big = layers.upper / "big"
        assert wait_for(lambda: big.exists() and big.stat().st_size >= (32 << 20) + 8 * 65536,
                        timeout=60), "the clients never got going"
        kill_daemon(mnt, pid)
        codes = [int(c.communicate(timeout=30)[0].strip()) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert set(codes) <= {errno.ENOTCONN, errno.ECONNABORTED}, codes
    assert_reports_dead_daemon(umount_dead(mnt), mnt)
