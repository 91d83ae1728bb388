"""The /dev/fuse binding (devfuse) through real mounts: file data passed
through to the backing files by the kernel (FUSE_PASSTHROUGH), the kernel's
one-backing-file-per-inode rule around copy-up, backing files released with
the last open, and ``-o passthrough=off``.

Whether data passes through the daemon is seen in the daemon's own I/O
counters (``rchar``/``wchar`` in /proc/PID/io count every byte it reads or
writes): a user sees it as the daemon's CPU time, which they replace.
"""

import errno
import json
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FUSE_UNIONFS, IS_ROOT, UNIONFS, Layers, force_unmount, requires_fuse, run
from reliability_helpers import daemon_pid

pytestmark = [
    requires_fuse,
    pytest.mark.skipif(bool(os.environ.get("UNIONFS_LIBFUSE")),
                       reason="UNIONFS_LIBFUSE selects a libfuse binding: no passthrough"),
]


def _passthrough_reason():
    if not IS_ROOT:
        return "passthrough needs CAP_SYS_ADMIN"
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return "passthrough needs the initial user namespace"
    except OSError as e:
        return str(e)
    return None


requires_passthrough = pytest.mark.skipif(_passthrough_reason() is not None,
                                          reason=_passthrough_reason() or "")

MIB = 1 << 20


def io_counters(pid):
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@requires_passthrough
def test_file_data_bypasses_the_daemon(layers, mounted):
    l0, _ = layers.lowers
    data = os.urandom(16 * MIB)
    (l0 / "big").write_bytes(data)
    mnt = mounted()
    pid = daemon_pid(mnt)
    r0, w0 = io_counters(pid)
    assert (mnt / "big").read_bytes() == data                  # the lower file
    with open(mnt / "new", "wb") as f:                          # an upper file
        f.write(data)
    with open(mnt / "big", "r+b") as f:                         # copied up, then written
        f.seek(MIB)
        f.write(b"x" * MIB)
    assert (mnt / "new").read_bytes() == data
    r1, w1 = io_counters(pid)
    # The daemon read and wrote its requests and the copy-up (16 MiB each
    # way), never the 16 + 16 + 1 + 16 MiB of file data.
    assert r1 - r0 < 20 * MIB and w1 - w0 < 20 * MIB, (r1 - r0, w1 - w0)
    assert (layers.upper / "new").read_bytes() == data
    want = data[:MIB] + b"x" * MIB + data[2 * MIB:]
    assert (layers.upper / "big").read_bytes() == want
    assert (l0 / "big").read_bytes() == data


def test_passthrough_off_serves_data_in_the_daemon(layers, mounted):
    l0, _ = layers.lowers
    data = os.urandom(8 * MIB)
    (l0 / "big").write_bytes(data)
    mnt = mounted(extra="passthrough=off")
    pid = daemon_pid(mnt)
    r0, _ = io_counters(pid)
    assert (mnt / "big").read_bytes() == data
    r1, _ = io_counters(pid)
    assert r1 - r0 >= 8 * MIB


def test_passthrough_option_is_checked(layers, mounter):
    r = run([UNIONFS, "mount", "-o", layers.options(extra="passthrough=maybe"),
             str(layers.mnt)])
    assert r.returncode != 0
    assert "passthrough=maybe: must be on or off" in r.stderr and "Traceback" not in r.stderr


@requires_passthrough
def test_write_open_while_the_lower_file_is_passed_through(layers, mounted):
    """The kernel holds one backing file per inode: the lower file while a
    read-only open reads it. A write-open copies up; it gets the upper file
    as a new inode (the kernel, told ESTALE, looks the name up again), so
    it succeeds, and every open after it sees the upper file."""
    l0, _ = layers.lowers
    (l0 / "f").write_bytes(b"lower data")
    mnt = mounted()
    with open(mnt / "f", "rb") as ro:
        assert ro.read() == b"lower data"
        m = mmap.mmap(ro.fileno(), 0, prot=mmap.PROT_READ)
        with open(mnt / "f", "r+b") as rw:
            rw.write(b"UPPER")
            rw.flush()
            assert (mnt / "f").read_bytes() == b"UPPER data"
            with open(mnt / "f", "rb") as again:
                assert again.read() == b"UPPER data"
        # What was opened before the copy-up keeps the lower file, as it
        # always did with this daemon (kernel overlayfs reopens the upper
        # for read(2), not for mmap).
        ro.seek(0)
        assert ro.read() == b"lower data"
        assert m[:] == b"lower data"
        m.close()
        assert os.fstat(ro.fileno()).st_size == len(b"UPPER data")
    assert (layers.upper / "f").read_bytes() == b"UPPER data"
    assert (l0 / "f").read_bytes() == b"lower data"
    # A shared writable mapping of the upper file writes it.
    with open(mnt / "f", "r+b") as rw:
        m = mmap.mmap(rw.fileno(), 0)
        m[:5] = b"MAPPD"
        m.flush()
        m.close()
    assert (mnt / "f").read_bytes() == b"MAPPD data"
    assert (layers.upper / "f").read_bytes() == b"MAPPD data"


@requires_passthrough
@pytest.mark.parametrize("first", ["append", "sync", "create-append"])
def test_an_append_or_sync_first_open_does_not_bind_later_ones(layers, mounted, first):
    """Opens of one inode share its backing file. A first open with
    O_APPEND or O_SYNC (flags now read from the request, not the fd) and a
    plain open after it: each writes where it should -- the plain one at
    its offset, the appending one at the end."""
    mnt = mounted()
    path = mnt / "f"
    if first == "create-append":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, b"0123456789")
    else:
        path.write_bytes(b"0123456789")
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if first == "append" else os.O_SYNC))
    try:
        with open(path, "r+b") as plain:
            plain.seek(2)
            plain.write(b"ab")
            plain.flush()
            os.write(fd, b"END")
        want = b"01ab456789END" if first != "sync" else b"ENDb456789"
        assert path.read_bytes() == want
    finally:
        os.close(fd)
    assert (layers.upper / "f").read_bytes() == want


@requires_passthrough
def test_read_only_then_write_open_of_an_upper_file(layers, mounted):
    """An upper file first opened read-only, then for writing while that
    open lasts (its backing file was read-only): both work."""
    mnt = mounted()
    (mnt / "u").write_bytes(b"one")
    with open(mnt / "u", "rb") as ro, open(mnt / "u", "ab") as app:
        app.write(b"two")
        app.flush()
        with open(mnt / "u", "rb") as again:
            assert again.read() == b"onetwo"
        assert ro.read() == b"onetwo"               # the same upper file
    assert (layers.upper / "u").read_bytes() == b"onetwo"


@requires_passthrough
def test_backing_files_are_released_with_the_last_open(tmp_path, mounter):
    """No daemon fd and no kernel reference to a backing file outlives the
    opens: after many opens and closes, the daemon's fds are as before,
    and deleting the files frees their space on the upper's filesystem (a
    private tmpfs, so nobody else's files count)."""
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(tmpfs)], check=True)
    try:
        layers = Layers(tmpfs)
        (layers.lowers[0] / "lower").write_bytes(b"l" * MIB)
        mnt = mounter.mount(layers)
        pid = daemon_pid(mnt)
        fds = open_fds(pid)
        free0 = os.statvfs(tmpfs).f_bfree
        for round_ in range(3):
            held = [open(mnt / "lower", "rb") for _ in range(5)]
            for i in range(40):
                with open(mnt / f"f{i}", "wb") as f:
                    f.write(b"d" * MIB)
                with open(mnt / f"f{i}", "rb") as f, open(mnt / f"f{i}", "r+b") as g:
                    assert f.read(1) == b"d"
                    g.write(b"e")
            for f in held:
                assert f.read() == b"l" * MIB
                f.close()
            for i in range(40):
                os.unlink(mnt / f"f{i}")
            assert open_fds(pid) == fds, round_
        # Every file is gone: their blocks are free again (a backing file
        # the kernel still held would keep its blocks).
        assert os.statvfs(tmpfs).f_bfree >= free0 - 16
    finally:
        for mnt in mounter.mounted:
            force_unmount(mnt)
        subprocess.run(["umount", str(tmpfs)], check=True)


@requires_passthrough
def test_unlinked_open_file_still_reads_and_writes(layers, mounted):
    mnt = mounted()
    with open(mnt / "gone", "w+b") as f:
        f.write(b"abc")
        f.flush()
        os.unlink(mnt / "gone")
        f.seek(0)
        assert f.read() == b"abc"
        f.write(b"def")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 6
    assert not (mnt / "gone").exists()


def test_version_names_the_binding():
    r = run([FUSE_UNIONFS, "--version"])
    assert r.returncode == 0
    assert "FUSE binding version devfuse" in r.stdout.splitlines()


@requires_passthrough
def test_a_reader_follows_a_writer_that_opened_after_it(layers, mounted):
    """`tail -f` of a log: the reader's open came first (read-only), the
    writer's second; the reader sees the file grow, by fstat and by read."""
    mnt = mounted()
    (mnt / "log").write_bytes(b"1\n")
    with open(mnt / "log", "rb") as reader:
        assert reader.read() == b"1\n"
        with open(mnt / "log", "ab") as writer:
            for line in (b"2\n", b"3\n"):
                writer.write(line)
                writer.flush()
                assert os.fstat(reader.fileno()).st_size == reader.tell() + 2
                assert reader.read() == line
        assert os.stat(mnt / "log").st_size == 6


@requires_passthrough
def test_a_reader_of_a_file_still_being_written(layers, mounted):
    """A file created write-only (as by a shell's `>`), read while the
    writer still writes."""
    mnt = mounted()
    with open(mnt / "out", "wb") as writer:
        writer.write(b"abc")
        writer.flush()
        with open(mnt / "out", "rb") as reader:
            assert reader.read() == b"abc"
            writer.write(b"def")
            writer.flush()
            assert os.fstat(reader.fileno()).st_size == 6
            assert reader.read() == b"def"
    assert (layers.upper / "out").read_bytes() == b"abcdef"


# -- POSIX ACLs: enforced and cached by the kernel (FUSE_POSIX_ACL), as on
# kernel overlayfs --------------------------------------------------------------

def _acl(entries):
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_ANY = 0xFFFFFFFF
NOBODY = 65534
# owner rw, user nobody r, group -, mask r, other -
_READ_FOR_NOBODY = _acl([(1, 6, _ANY), (2, 4, NOBODY), (4, 0, _ANY), (0x10, 4, _ANY),
                         (0x20, 0, _ANY)])


def _as_nobody_read(path):
    r = subprocess.run([sys.executable, "-c", (
        "import os, sys\nos.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    print(open(sys.argv[1]).read().strip())\n"
        "except OSError as e:\n    print('errno', e.errno)\n"), str(path)],
        capture_output=True, text=True, timeout=60)
    return r.stdout.strip() or r.stderr.strip()


def _xattr(path, name):
    try:
        return os.getxattr(path, name).hex()
    except OSError as e:
        return f"errno {e.errno}"


def _acl_story(m):
    """What a user sees of ACLs on mount ``m`` (lower: f 0640 with an ACL
    granting nobody read, d 0777 with that ACL as default)."""
    out = {"nobody reads f": _as_nobody_read(m / "f"),
           "f acl": _xattr(m / "f", "system.posix_acl_access")}
    old = os.umask(0o022)
    try:
        (m / "d" / "new").write_text("n")
        os.mkdir(m / "d" / "sub", 0o777)
    finally:
        os.umask(old)
    out["new mode"] = oct(os.stat(m / "d" / "new").st_mode)
    out["new acl"] = _xattr(m / "d" / "new", "system.posix_acl_access")
    out["sub mode"] = oct(os.stat(m / "d" / "sub").st_mode)
    out["sub default acl"] = _xattr(m / "d" / "sub", "system.posix_acl_default")
    os.chmod(m / "f", 0o604)                    # the mask follows group bits
    out["f acl after chmod"] = _xattr(m / "f", "system.posix_acl_access")
    out["nobody reads f after chmod"] = _as_nobody_read(m / "f")
    (m / "g").write_text("g")
    os.chmod(m / "g", 0o600)
    out["nobody reads g"] = _as_nobody_read(m / "g")
    os.setxattr(m / "g", "system.posix_acl_access", _READ_FOR_NOBODY)
    out["g mode after setting an acl"] = oct(os.stat(m / "g").st_mode)
    out["nobody reads g with the acl"] = _as_nobody_read(m / "g")
    os.removexattr(m / "g", "system.posix_acl_access")
    out["nobody reads g without it"] = _as_nobody_read(m / "g")
    return out


@pytest.fixture
def traversable_dir():
    """A directory every user may traverse (tmp_path is 0700)."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="unionfs-acl-")
    os.chmod(base, 0o755)
    try:
        yield Path(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="needs root (kernel overlayfs, other users)")
def test_posix_acls_as_kernel_overlayfs(traversable_dir, mounter):
    """ACLs grant and deny, are inherited and follow chmod as on kernel
    overlayfs (the kernel enforces them: FUSE_POSIX_ACL)."""
    stories = {}
    for system in ("overlayfs", "unionfs"):
        layers = Layers(traversable_dir / system, nlower=1)
        low = layers.lowers[0]
        (low / "f").write_text("data")
        os.chmod(low / "f", 0o640)
        (low / "d").mkdir()
        os.chmod(low / "d", 0o777)
        try:
            os.setxattr(low / "f", "system.posix_acl_access", _READ_FOR_NOBODY)
            os.setxattr(low / "d", "system.posix_acl_default", _READ_FOR_NOBODY)
        except OSError as e:
            pytest.skip(f"no POSIX ACLs on {low}: {e}")
        for d in (traversable_dir / system, layers.mnt):
            os.chmod(d, 0o755)
        if system == "overlayfs":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layers.options(),
                            str(layers.mnt)], check=True)
            try:
                stories[system] = _acl_story(layers.mnt)
            finally:
                subprocess.run(["umount", str(layers.mnt)], check=True)
        else:
            stories[system] = _acl_story(mounter.mount(layers))
    assert stories["unionfs"] == stories["overlayfs"]
    assert stories["unionfs"]["nobody reads f"] == "data"       # the ACL grants it
    assert stories["unionfs"]["nobody reads g"] == f"errno {errno.EACCES}"


def test_threaded_readers_answer_every_request(layers, mounted):
    """threaded=1: several threads, each reading its own clone of the
    device fd (a request must be answered on the fd it came from)."""
    (layers.lowers[0] / "a").write_text("lower")
    mnt = mounted(extra="threaded=1")
    script = (
        "import os, sys\n"
        "m, i = sys.argv[1], sys.argv[2]\n"
        "for j in range(100):\n"
        "    with open(f'{m}/f{i}', 'w') as f: f.write(str(j))\n"
        "    assert open(f'{m}/a').read() == 'lower'\n"
        "    os.stat(f'{m}/f{i}'); os.listdir(m)\n"
        "print(open(f'{m}/f{i}').read())\n")
    # Every access from a child with a timeout: a lost reply hangs its caller.
    procs = [subprocess.Popen([sys.executable, "-c", script, str(mnt), str(i)],
                              stdout=subprocess.PIPE, text=True) for i in range(6)]
    try:
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert outs == ["99"] * 6
    listed = run([sys.executable, "-c", f"import os; print(sorted(os.listdir({str(mnt)!r})))"])
    assert listed.stdout.strip() == str(["a"] + sorted(f"f{i}" for i in range(6)))


# -- set-id bits (HANDLE_KILLPRIV_V2) -------------------------------------------------

# Run as root by one process per mount; ``as_nobody`` forks a child that is
# uid/gid 65534 with no supplementary groups. Prints {check: mode} as JSON.
_SETID_STORY = r"""
import json, mmap, os, stat, sys
m = sys.argv[1]
P = lambda n: os.path.join(m, n)
def as_nobody(fn):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
def mode(n):
    return oct(stat.S_IMODE(os.lstat(P(n)).st_mode))
def append(n):
    with open(P(n), "a") as f:
        f.write("x")
def direct(n):
    fd = os.open(P(n), os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    os.write(fd, buf)
    os.close(fd)
out = {}
for n in ("suid", "sgid_x", "sgid_nox", "plain"):
    as_nobody(lambda: append(n))
    out["write " + n] = mode(n)
for n in ("direct_suid", "direct_sgid_nox"):
    as_nobody(lambda: direct(n))
    out["O_DIRECT " + n] = mode(n)
# A writer that opened the file before it became set-uid.
opened, chmodded = os.pipe(), os.pipe()
pid = os.fork()
if pid == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    fd = os.open(P("late"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"before")
    os.write(opened[1], b"1")
    os.read(chmodded[0], 1)
    os.write(fd, b"after")
    os._exit(0)
os.read(opened[0], 1)
os.chmod(P("late"), 0o4777)
os.write(chmodded[1], b"2")
os.waitpid(pid, 0)
out["write after chmod u+s"] = mode("late")
print(json.dumps(out))
"""

_SETID_FILES = {"suid": 0o4777, "sgid_x": 0o2777, "sgid_nox": 0o2766, "plain": 0o666,
                "direct_suid": 0o4777, "direct_sgid_nox": 0o2766, "late": 0o777}


@pytest.mark.skipif(not IS_ROOT, reason="needs root (kernel overlayfs, other users)")
def test_setid_bits_dropped_as_kernel_overlayfs(traversable_dir, mounter):
    """Writes by a user outside the group, through the daemon
    (passthrough=off), passed through, with O_DIRECT, and by a writer that
    opened the file before chmod u+s, remove set-id bits as on kernel
    overlayfs (the daemon applies the kernel's rule: HANDLE_KILLPRIV_V2)."""
    stories = {}
    for system in ("overlayfs", "passthrough=off", "passthrough=on"):
        base = traversable_dir / system.replace("=", "-")
        layers = Layers(base, nlower=1)
        for name, mode in _SETID_FILES.items():
            f = layers.lowers[0] / name
            f.write_bytes(b"\0" * 4096)
            os.chmod(f, mode)
        for d in (base, layers.mnt):
            os.chmod(d, 0o755)
        os.chmod(layers.lowers[0], 0o777)
        if system == "overlayfs":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layers.options(),
                            str(layers.mnt)], check=True)
            mnt = layers.mnt
        else:
            mnt = mounter.mount(layers, extra=system)
        try:
            r = subprocess.run([sys.executable, "-c", _SETID_STORY, str(mnt)],
                               capture_output=True, text=True, timeout=60)
        finally:
            if system == "overlayfs":
                subprocess.run(["umount", str(layers.mnt)], check=True)
        assert r.returncode == 0, r.stderr
        stories[system] = json.loads(r.stdout)
    assert stories["overlayfs"]["write sgid_nox"] == "0o766"      # the kernel's rule
    assert stories["overlayfs"]["write after chmod u+s"] == "0o777"
    assert stories["passthrough=off"] == stories["overlayfs"]
    assert stories["passthrough=on"] == stories["overlayfs"]


def test_writes_cost_no_request_each(layers, mounted):
    """A run of small write(2)s asks the daemon nothing per write when it
    passes data through, and only the WRITE itself otherwise: no
    getxattr("security.capability") before each (HANDLE_KILLPRIV_V2 lets
    the kernel skip it for files without set-id bits or capabilities)."""
    (layers.lowers[0] / "lower").write_bytes(b"lower\n")
    mnt = mounted()
    writes = 500
    for name in ("new", "lower"):
        with open(mnt / name, "ab", buffering=0) as f:
            for _ in range(writes):
                f.write(b"x" * 100)
    r = run([UNIONFS, "stats", "--json", str(mnt)], timeout=30)
    assert r.returncode == 0, r.stderr
    counts = {name: v["count"] for name, v in json.loads(r.stdout)["requests"].items()}
    assert counts.get("getxattr", 0) < 20, counts
    assert (layers.upper / "lower").read_bytes() == b"lower\n" + b"x" * 100 * writes
