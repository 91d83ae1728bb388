"""Unit tests of the union core's saved system calls (issue 17, third
round), on plain directories (no FUSE): each answer the core now gives
from what it already knows must stay the answer the layers would give."""

import errno
import os
import stat

import pytest

from conftest import write
from unionfs import whiteout as wh
from unionfs.union import Union


@pytest.fixture
def dirs(tmp_path):
    d = {n: tmp_path / n for n in ("lower", "upper", "work")}
    for p in d.values():
        p.mkdir()
    write(d["lower"] / "d" / "f", "lower data")
    write(d["lower"] / "d" / "gone", "hidden")
    write(d["upper"] / "d" / (wh.WH_PREFIX + "gone"))     # OCI marker hides d/gone
    (d["upper"] / "new").mkdir()                            # nothing below it
    return d


def make_union(d, **kw):
    return Union([str(d["lower"])], str(d["upper"]), str(d["work"]),
                 whiteout=wh.FORMAT_OCI, **kw)


def count_calls(monkeypatch, layer, names):
    """Count calls of ``layer``'s methods ``names`` (still calling them)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(layer, name)

        def counted(*args, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(layer, name, counted)
    return counts


def no_xattr(u, path, name):
    with pytest.raises(OSError) as e:
        u.getxattr(path, name)
    return e.value.errno == errno.ENODATA


def test_new_file_has_no_capability_without_a_call(dirs, monkeypatch):
    u = make_union(dirs)
    assert u.stack.lookup("/new/f") is None     # the kernel's LOOKUP first
    counts = count_calls(monkeypatch, u.upper, ["getxattr", "listxattr"])
    os.close(u.create("/new/f", 0o644, os.O_WRONLY))
    st, ino, _ = u.lstat("/new/f")
    assert ino == st.st_ino
    assert no_xattr(u, "/new/f", "security.capability")
    assert counts == {"getxattr": 0, "listxattr": 0}
    u.setxattr("/new/f", "user.k", b"v", 0)
    assert u.getxattr("/new/f", "user.k") == b"v"


def test_new_file_shows_the_xattrs_it_was_made_with(dirs):
    """An LSM label or an inherited ACL is there from the start: stand-in,
    a name set on the upper file as it is made."""
    u = make_union(dirs)
    os.close(u.create("/new/f", 0o644, os.O_WRONLY))
    os.setxattr(dirs["upper"] / "new" / "f", "user.label", b"l")
    assert u.getxattr("/new/f", "user.label") == b"l"
    assert "user.label" in u.listxattr("/new/f")


def test_new_link_reads_the_records_of_its_file(dirs):
    u = make_union(dirs)
    ino = u.lstat("/d/f")[1]
    u.chmod("/d/f", 0o600)                  # copied up: its number is recorded
    u.link("/d/f", "/new/l")
    assert u.lstat("/new/l")[1] == ino


def test_xattr_change_through_one_link_shows_through_the_other(dirs):
    u = make_union(dirs)
    os.close(u.create("/new/a", 0o644, os.O_WRONLY))
    u.link("/new/a", "/new/b")
    for p in ("/new/a", "/new/b"):
        u.lstat(p)
        assert no_xattr(u, p, "user.k")         # both names' answers cached
    u.setxattr("/new/a", "user.k", b"v", 0)
    assert u.getxattr("/new/b", "user.k") == b"v"
    u.removexattr("/new/b", "user.k")
    assert no_xattr(u, "/new/a", "user.k")


def test_xattr_set_on_the_upper_behind_the_union_is_not_invented(dirs):
    """Names kept for an upper entry are a superset of what it has: one
    removed by the kernel (a write's killpriv) reads ENODATA from disk."""
    u = make_union(dirs)
    os.close(u.create("/new/f", 0o644, os.O_WRONLY))
    u.setxattr("/new/f", "user.k", b"v", 0)
    assert u.getxattr("/new/f", "user.k") == b"v"
    os.removexattr(dirs["upper"] / "new" / "f", "user.k")
    assert no_xattr(u, "/new/f", "user.k")


def test_create_over_a_cached_whiteout_replaces_the_marker(dirs):
    u = make_union(dirs)
    assert u.stack.lookup("/d/gone") is None        # cached: the upper whites it out
    fd = u.create("/d/gone", 0o644, os.O_WRONLY)
    os.write(fd, b"new")
    os.close(fd)
    assert not (dirs["upper"] / "d" / (wh.WH_PREFIX + "gone")).exists()
    assert (dirs["upper"] / "d" / "gone").read_text() == "new"
    assert "gone" in {n for n, _, _ in u.listdir("/d")}


def test_create_over_an_uncached_whiteout_replaces_the_marker(dirs):
    u = make_union(dirs)
    u.listdir("/d")
    u.stack.invalidate("/d/gone")
    os.close(u.create("/d/gone", 0o644, os.O_WRONLY))
    assert not (dirs["upper"] / "d" / (wh.WH_PREFIX + "gone")).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a 0/0 device whiteout needs CAP_MKNOD")
def test_create_over_a_device_whiteout_where_nothing_is_below(dirs):
    os.mknod(dirs["upper"] / "new" / "x", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    u = Union([str(dirs["lower"])], str(dirs["upper"]), str(dirs["work"]),
              whiteout=wh.FORMAT_OVERLAY)
    assert u.stack.lookup("/new/x") is None
    os.close(u.create("/new/x", 0o644, os.O_WRONLY))
    assert stat.S_ISREG(os.lstat(dirs["upper"] / "new" / "x").st_mode)


def test_missing_name_where_nothing_is_below_costs_one_lstat(dirs, monkeypatch):
    u = make_union(dirs)
    u.stack.lookup("/new")
    counts = count_calls(monkeypatch, u.upper, ["lstat"])
    assert u.stack.lookup("/new/nothing") is None
    assert counts["lstat"] == 1
    u.stack.lookup("/d")
    counts["lstat"] = 0
    assert u.stack.lookup("/d/nothing") is None     # a marker could hide d/nothing
    assert counts["lstat"] == 2


def test_metacopy_copy_up_is_stat_ed_without_reading_its_records(dirs, monkeypatch):
    u = make_union(dirs, metacopy=True)
    before = u.lstat("/d/f")
    u.chmod("/d/f", 0o600)
    counts = count_calls(monkeypatch, u.upper, ["getxattr", "listxattr"])
    st, ino, _ = u.lstat("/d/f")
    assert counts == {"getxattr": 0, "listxattr": 0}
    assert ino == before[1] and stat.S_IMODE(st.st_mode) == 0o600
    fd = u.open("/d/f", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"lower data"
    finally:
        os.close(fd)
    # A fresh union reads the same from the records on disk.
    again = make_union(dirs, metacopy=True)
    assert again.lstat("/d/f")[1] == ino
    assert again.lower_data("/d/f", again.node("/d/f")) is not None


def test_chown_given_the_stat_clears_set_id_bits(dirs):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    u = make_union(dirs)
    os.close(u.create("/new/s", 0o755, os.O_WRONLY))
    u.chmod("/new/s", 0o6755)
    st = u.lstat("/new/s")[0]
    u.chown("/new/s", 1000, 1000, st=st)
    assert stat.S_IMODE(os.lstat(dirs["upper"] / "new" / "s").st_mode) == 0o755
