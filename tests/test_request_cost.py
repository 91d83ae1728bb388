"""The cheaper ways the daemon answers a request (issue 17), each held to
the way it replaced: same bytes to the kernel, same files on disk, same
choice of who serves a request. No mount: pure logic on tmp_path trees.

- attribute and entry replies packed straight from ``os.stat_result``
  (devfuse) carry the bytes the struct stat path carried;
- chmod and utimes of a backing path in one system call each
  (``osutil.lchmod``, ``osutil.lutimes_ns``) act as chmod/utimensat on the
  path itself;
- attribute changes that copy up no data are quick (``Union.settled``
  with ``meta``), so they are served inline, not by a worker;
- ``scripts/request_cost.py``, which measures a request's cost this way,
  runs and refuses what it cannot measure in one line.
"""

import errno
import os
import stat
import subprocess
import sys

import pytest

from unionfs import osutil
from unionfs.binding import common
from unionfs.binding import devfuse
from unionfs.binding import fuseproto as P
from unionfs.union import Union

_NS = 1_000_000_000


def _stat(mode=0o100644, ino=12, nlink=1, uid=1000, gid=100, size=4242, atime_ns=0,
          mtime_ns=0, ctime_ns=0, rdev=0, blocks=16):
    def whole(ns):
        return ns // _NS
    return os.stat_result(
        (mode, ino, 2049, nlink, uid, gid, size, whole(atime_ns), whole(mtime_ns),
         whole(ctime_ns)),
        {"st_atime": atime_ns / _NS, "st_mtime": mtime_ns / _NS, "st_ctime": ctime_ns / _NS,
         "st_atime_ns": atime_ns, "st_mtime_ns": mtime_ns, "st_ctime_ns": ctime_ns,
         "st_blksize": 4096, "st_blocks": blocks, "st_rdev": rdev})


STATS = {
    "file": _stat(atime_ns=1_700_000_000_123_456_789, mtime_ns=1_600_000_000_000_000_001,
                  ctime_ns=1_750_000_000_999_999_999),
    "before 1970": _stat(atime_ns=-1_500_000_000, mtime_ns=-1, ctime_ns=-_NS),
    "device": _stat(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(4095, 1 << 19), size=0),
    "many links": _stat(nlink=1 << 33),
    "directory": _stat(mode=stat.S_IFDIR | 0o755, nlink=7, size=4096),
}


class _Pipe:
    """A request whose reply lands in a pipe, to be read back as bytes."""

    def __init__(self):
        self.r, self.w = os.pipe()
        self.unique = 0

    def req(self):
        self.unique += 1
        return devfuse.Request(None, self.w, self.unique, 5, P.GETATTR, 0, 0, 1)

    def reply(self):
        return os.read(self.r, 1 << 16)

    def close(self):
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def pipe():
    p = _Pipe()
    yield p
    p.close()


@pytest.mark.parametrize("kind", sorted(STATS))
def test_attr_reply_from_stat_result_is_the_struct_stat_one(pipe, kind):
    st = STATS[kind]
    nlink = min(st.st_nlink, 3)
    for timeout in (0.0, 1.5, 1e6):
        cst = common.c_stat()
        common.fill_c_stat(cst, st, 77, nlink, 1234, 5678)
        devfuse.reply_attr(pipe.req(), cst, timeout)
        via_struct = pipe.reply()
        devfuse.reply_stat(pipe.req(), st, 77, nlink, 1234, 5678, timeout)
        direct = pipe.reply()
        header = P.OUT_HEADER.size                 # (its unique differs)
        assert direct[header:] == via_struct[header:]
        assert direct[:8] == via_struct[:8]         # length, error
        assert len(direct) == len(via_struct) == P.OUT_HEADER.size + P.ATTR_OUT.size


@pytest.mark.parametrize("kind", sorted(STATS))
def test_entry_from_stat_result_shows_what_was_asked(pipe, kind):
    st = STATS[kind]
    e = devfuse.entry(42, st, 77, st.st_nlink, 1234, 5678, 2.5, 1e6)
    assert e.ino == 42
    devfuse.reply_entry(pipe.req(), e)
    v = P.ENTRY_OUT.unpack_from(pipe.reply(), P.OUT_HEADER.size)
    nodeid, _, entry_s, attr_s, entry_ns, attr_ns = v[:6]
    (ino, size, _, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid,
     gid, rdev, _, _) = v[6:]
    assert (nodeid, entry_s, entry_ns, attr_s, attr_ns) == (42, 1_000_000, 0, 2, 500_000_000)
    assert (ino, size, mode, uid, gid) == (77, st.st_size, st.st_mode, 1234, 5678)
    assert nlink == min(st.st_nlink, 0xFFFFFFFF)
    assert rdev == st.st_rdev & 0xFFFFFFFF
    assert atime * _NS + atimensec == st.st_atime_ns
    assert mtime * _NS + mtimensec == st.st_mtime_ns
    assert ctime * _NS + ctimensec == st.st_ctime_ns
    assert 0 <= atimensec < _NS and 0 <= mtimensec < _NS and 0 <= ctimensec < _NS


def test_negative_and_bare_entries(pipe):
    devfuse.reply_entry(pipe.req(), devfuse.entry(0, None, 0, 0, 0, 0, 0.0, 30.25))
    v = P.ENTRY_OUT.unpack_from(pipe.reply(), P.OUT_HEADER.size)
    assert v[:6] == (0, 0, 30, 0, 250_000_000, 0) and not any(v[6:])
    bare = devfuse.bare_entry(99, stat.S_IFDIR)
    assert (bare.ino, bare.attr_ino, bare.mode) == (0, 99, stat.S_IFDIR)


def test_lchmod_sets_the_mode_of_the_path_itself(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    osutil.lchmod(str(f), 0o4751)
    assert stat.S_IMODE(f.lstat().st_mode) == 0o4751
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(OSError) as e:
        osutil.lchmod(str(link), 0o600)
    assert e.value.errno == errno.EOPNOTSUPP
    assert stat.S_IMODE(f.lstat().st_mode) == 0o4751        # the target untouched
    with pytest.raises(FileNotFoundError):
        osutil.lchmod(str(tmp_path / "missing"), 0o600)


def test_lutimes_ns_leaves_the_time_given_as_none(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    os.utime(f, ns=(1_000_000_000_000, 2_000_000_000_000))
    osutil.lutimes_ns(str(f), None, 5_000_000_123)
    st = f.lstat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000, 5_000_000_123)
    osutil.lutimes_ns(str(f), -1_500_000_000, None)
    st = f.lstat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_500_000_000, 5_000_000_123)
    link = tmp_path / "link"
    link.symlink_to(f)
    osutil.lutimes_ns(str(link), 7 * _NS, 8 * _NS)
    assert link.lstat().st_mtime_ns == 8 * _NS
    assert f.lstat().st_mtime_ns == 5_000_000_123            # not followed
    with pytest.raises(FileNotFoundError):
        osutil.lutimes_ns(str(tmp_path / "missing"), 1, 1)


@pytest.mark.parametrize("metacopy", [False, True])
def test_which_attribute_changes_copy_up_data(tmp_path, metacopy):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "dir").mkdir()
    (lower / "file").write_text("data")
    (lower / "linked").write_text("two names")
    os.link(lower / "linked", lower / "other-name")
    (lower / "sym").symlink_to("file")
    (upper / "new").write_text("upper")
    u = Union([str(lower)], str(upper), str(work), metacopy=metacopy)

    def meta(path):
        return u.settled(path, meta=True)
    assert meta("/dir") and meta("/sym") and meta("/new") and meta("/missing")
    assert meta("/file") is metacopy        # a metacopy copies no data
    assert not meta("/linked")              # hard links are copied up whole
    # Any change (a write, a truncate, a rename) of a lower entry copies it up.
    assert not u.settled("/file") and not u.settled("/dir") and u.settled("/new")
    # What settled() promised: with metacopy the copy-up of an attribute
    # change leaves the data below (a sparse upper file).
    u.chmod("/file", 0o600)
    copy = (upper / "file").stat()
    assert copy.st_size == 4 and stat.S_IMODE(copy.st_mode) == 0o600
    data_below = u.lower_data("/file", u.node("/file"))
    if metacopy:        # (the lower layer, the merged path of its data)
        layer, data_path = data_below
        assert (layer.root, data_path) == (str(lower), "/file")
    else:
        assert data_below is None
    if not metacopy:
        assert (upper / "file").read_text() == "data"
    assert u.settled("/file", meta=True)


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "request_cost.py")


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK) or bool(
    os.environ.get("UNIONFS_LIBFUSE")), reason="the /dev/fuse binding is not in use")
def test_request_cost_script_reports_each_kind():
    r = subprocess.run([sys.executable, SCRIPT, "--requests", "50"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kinds = [line.rsplit(None, 3)[0] for line in r.stdout.splitlines()]
    assert kinds == ["reply only", "GETXATTR", "GETATTR", "LOOKUP"], r.stdout
    assert all(float(line.split()[-3]) > 0 for line in r.stdout.splitlines())


def test_request_cost_script_refuses_a_libfuse_binding():
    r = subprocess.run([sys.executable, SCRIPT, "--requests", "5"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, UNIONFS_LIBFUSE="3"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not in use" in r.stderr and "Traceback" not in r.stderr
