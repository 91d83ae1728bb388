"""Unit tests of the bounded caches of the layer stack (layers.py), on plain
directories (no FUSE): with tiny bounds every cache starts over many times,
and what the union shows must not change."""

import os

import pytest

from conftest import write
from unionfs import layers
from unionfs import whiteout as wh
from unionfs.union import Union


@pytest.fixture
def stack_dirs(tmp_path):
    """Two lowers and an upper with shadowing, whiteouts and an opaque dir."""
    d = {n: tmp_path / n for n in ("l0", "l1", "upper", "work")}
    for p in d.values():
        p.mkdir()
    for i in range(6):
        for j in range(5):
            write(d["l1"] / f"d{i}" / f"f{j}", "bottom")
        write(d["l0"] / f"d{i}" / "f0", "top")
        write(d["l0"] / f"d{i}" / f"only{i}", "top")
    write(d["l0"] / "d1" / (wh.WH_PREFIX + "f1"))          # hides l1's d1/f1
    write(d["l0"] / "d2" / wh.WH_OPAQUE)                   # hides all of l1's d2
    write(d["upper"] / "d3" / "new", "upper")
    return d


def make_union(d):
    return Union([str(d["l0"]), str(d["l1"])], str(d["upper"]), str(d["work"]),
                 whiteout=wh.FORMAT_OCI)


def snapshot(u):
    """Every merged path with its kind, contents and listing, walked twice
    (the second walk finds what the first left in the caches)."""
    out = []
    for _ in range(2):
        todo = ["/"]
        while todo:
            path = todo.pop()
            node = u.stack.lookup(path)
            if node.is_dir:
                names = sorted(n for n, _, _ in u.listdir(path))
                out.append((path, "dir", names))
                todo += [layers.child_path(path, n) for n in names]
            else:
                fd = u.open(path, os.O_RDONLY)
                try:
                    out.append((path, os.read(fd, 100)))
                finally:
                    os.close(fd)
    return out


def shrink(monkeypatch):
    monkeypatch.setattr(layers, "MAX_CACHED_NODES", 3)
    monkeypatch.setattr(layers, "MAX_CACHED_LISTED", 8)
    monkeypatch.setattr(layers, "MAX_INDEXED_NAMES", 8)


def test_tiny_caches_show_the_same_tree(stack_dirs, monkeypatch):
    want = snapshot(make_union(stack_dirs))
    assert ("/d1", "dir", ["f0", "f2", "f3", "f4", "only1"]) in want
    assert ("/d2", "dir", ["f0", "only2"]) in want
    assert ("/d3/new", b"upper") in want
    shrink(monkeypatch)
    u = make_union(stack_dirs)
    assert snapshot(u) == want
    st = u.stack
    assert len(st._cache) <= layers.MAX_CACHED_NODES
    # One listing bigger than the bound is kept (the newest stays).
    assert sum(map(len, st._listings.values())) == st._listed
    assert len(st._listings) == 1 or st._listed <= layers.MAX_CACHED_LISTED
    # One budget for the DirIndex caches of all lowers.
    indexes = [i for layer in st.lowers for i in layer._dirs.values()]
    budget = st.lowers[0]._budget
    assert all(layer._budget is budget for layer in st.lowers)
    assert sum(len(i.kinds) for i in indexes) == budget.used
    assert len(indexes) == 1 or budget.used <= layers.MAX_INDEXED_NAMES


def test_listing_count_follows_invalidation(stack_dirs):
    u = make_union(stack_dirs)
    for i in range(6):
        u.listdir(f"/d{i}")
    st = u.stack
    assert st._listed == sum(map(len, st._listings.values())) > 0
    u.unlink("/d0/f0")              # drops the listing of /d0
    assert "/d0" not in st._listings
    assert st._listed == sum(map(len, st._listings.values()))
    st.invalidate("/", tree=True)
    assert st._listed == 0 and not st._listings


def test_opacity_without_reading_the_directory(stack_dirs):
    """A lookup of a directory asks whether it is opaque without indexing
    its entries; both kinds of marker count."""
    u = make_union(stack_dirs)
    top = u.stack.lowers[0]
    assert top.is_opaque("/d2") and not top.is_opaque("/d1")
    assert "/d2" not in top._dirs and "/d1" not in top._dirs
    os.setxattr(stack_dirs["l0"] / "d4", "user.overlay.opaque", wh.OVL_OPAQUE_VALUE)
    assert top.is_opaque("/d4") and "/d4" not in top._dirs
    assert u.stack.lookup("/d4").layers == (top,)
    # Indexed or not, the answer is the same.
    top.child_kind("/d2", "f0")
    assert "/d2" in top._dirs and top.is_opaque("/d2")


def test_listing_indexes_the_lowers_in_the_same_read(stack_dirs, monkeypatch):
    """Listing a merged directory reads each lower directory once, and
    that read is also the index the lookups of its names use: looking up
    every listed name (what readdirplus and find do next) reads nothing
    again. A directory read a second time is counted once in the budget."""
    u = make_union(stack_dirs)
    reads = []
    real = layers.Layer.scandir
    monkeypatch.setattr(layers.Layer, "scandir",
                        lambda self, path: reads.append((self.index, path)) or real(self, path))
    u.stack.lookup("/d1")
    reads.clear()
    names = sorted(n for n, _, _ in u.listdir("/d1"))
    assert names == ["f0", "f2", "f3", "f4", "only1"]
    assert sorted(reads) == [(1, "/d1"), (2, "/d1")]
    top, bottom = u.stack.lowers
    assert top._dirs["/d1"].kinds["f1"] == layers.WHITEOUT
    assert bottom._dirs["/d1"].kinds["f1"] == layers.NONDIR
    reads.clear()
    shown = {n: u.stack.lookup("/d1/" + n).top for n in names}
    assert u.stack.lookup("/d1/f1") is None
    assert reads == []
    assert shown["f0"] is top and shown["f2"] is bottom and shown["only1"] is top
    u.stack.invalidate("/d1")
    assert sorted(n for n, _, _ in u.listdir("/d1")) == names
    budget = top._budget
    assert budget.used == sum(len(i.kinds) for layer in u.stack.lowers
                              for i in layer._dirs.values())


def test_opacity_is_asked_only_with_a_directory_below(stack_dirs, monkeypatch):
    """A directory's opacity matters only if a layer below has the same
    directory: one that lives in one layer is looked up without asking,
    and an opaque one still hides the layers below."""
    (stack_dirs["l1"] / "solo" / "sub").mkdir(parents=True)
    asked = []
    real = layers.Layer.is_opaque
    monkeypatch.setattr(layers.Layer, "is_opaque",
                        lambda self, path: asked.append((self.index, path)) or real(self, path))
    u = make_union(stack_dirs)
    top, bottom = u.stack.lowers
    assert u.stack.lookup("/solo/sub").layers == (bottom,)
    assert not [a for a in asked if a[1].startswith("/solo")]
    assert u.stack.lookup("/d2").layers == (top,)           # opaque in l0
    assert (1, "/d2") in asked
    assert u.stack.lookup("/d1").layers == (top, bottom)
    assert u.stack.lookup("/d3").layers == (u.upper, top, bottom)
    assert sorted(n for n, _, _ in u.listdir("/d2")) == ["f0", "only2"]


def test_opacity_of_a_directory_read_before_it_was_asked(stack_dirs):
    """A listing reads a lower directory without asking its opacity
    xattr; asked later, the answer is the xattr's (and the marker's)."""
    os.setxattr(stack_dirs["l0"] / "d4", "user.overlay.opaque", wh.OVL_OPAQUE_VALUE)
    u = make_union(stack_dirs)
    top, bottom = u.stack.lowers
    for d in ("/d1", "/d2", "/d4"):
        top.scan(d)
    assert top._dirs["/d4"].opaque is None and top._dirs["/d2"].opaque is True
    assert top.is_opaque("/d4") and top.is_opaque("/d2") and not top.is_opaque("/d1")
    assert u.stack.lookup("/d4").layers == (top,)
    assert sorted(n for n, _, _ in u.listdir("/d4")) == ["f0", "only4"]
    assert u.stack.lookup("/d1").layers == (top, bottom)
