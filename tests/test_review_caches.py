"""Second-read tests of this round's caches (issue 17, third round), on
plain directories (no FUSE): answers the core keeps must stay the answers
the layers give, whatever was cached before."""

import errno
import os

import pytest

from conftest import write
from unionfs import layers
from unionfs import whiteout as wh
from unionfs.union import Union


@pytest.fixture
def dirs(tmp_path):
    d = {n: tmp_path / n for n in ("lower", "upper", "work")}
    for p in d.values():
        p.mkdir()
    write(d["lower"] / "d" / "sub" / "f", "lower data")
    return d


def make_union(d, **kw):
    return Union([str(d["lower"])], str(d["upper"]), str(d["work"]),
                 whiteout=wh.FORMAT_OCI, **kw)


def test_below_a_removed_directory_nothing_shows(dirs):
    """A directory removed (whited out) and looked up again is cached as
    whited out: a path below it shows nothing (ENOENT), as before the
    removal's lookup was cached."""
    u = make_union(dirs)
    u.unlink("/d/sub/f")
    u.rmdir("/d/sub")
    u.rmdir("/d")
    assert u.stack.lookup("/d") is None            # now cached: whited out
    assert u.stack.lookup("/d/sub") is None
    assert u.stack.lookup("/d/sub/f") is None
    with pytest.raises(OSError) as e:
        u.mkdir("/d/new", 0o755)
    assert e.value.errno == errno.ENOENT
    assert sorted(os.listdir(dirs["upper"])) == [wh.WH_PREFIX + "d"]


def test_a_copy_up_shows_its_number_only_once_its_data_path_is_known(dirs, monkeypatch):
    """A node's number is what says its other facts are learned (Union.lstat,
    lower_data: no lock): a copy-up must give it last, or a thread that
    opens the metacopy meanwhile reads the upper's empty (sparse) file
    instead of the lower data."""
    seen = []

    class Watched(layers.Node):
        __slots__ = ()

        def __setattr__(self, name, value):
            if name == "ino" and value is not None and self.in_upper and not self.is_dir:
                seen.append((self.data, self.hidden_links))
            super().__setattr__(name, value)
    monkeypatch.setattr(layers, "Node", Watched)
    u = make_union(dirs, metacopy=True)
    u.lstat("/d/sub/f")
    u.chmod("/d/sub/f", 0o600)
    assert seen == [("/d/sub/f", 0)]
    fd = u.open("/d/sub/f", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"lower data"
    finally:
        os.close(fd)
