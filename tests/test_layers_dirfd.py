"""Unit tests of how the core reaches backing files: relative to cached
directory descriptors (layers.py), never through a symlink inside a layer,
at any depth, and never through a descriptor gone stale (no mount)."""

import errno
import os

import pytest

from unionfs import layers as L
from unionfs.layers import Layer
from unionfs.union import Union

COMP = "c" * 200
DEPTH = 26          # 26 * 201 bytes: merged paths longer than PATH_MAX


def deep_path(depth=DEPTH, comp=COMP):
    return "/" + "/".join([comp] * depth)



def _deep_dir(top):
    """An fd of a directory DEPTH components of COMP below ``top``,
    made relative to descriptors (no path that long can be named)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        os.mkdir(COMP, dir_fd=fd)
        nfd = os.open(COMP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd

def test_symlinked_component_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_text("secret\n")
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    os.symlink(outside, layer_dir / "link")
    (layer_dir / "real").mkdir()
    layer = Layer(layer_dir, 0, upper=True)
    for call, args in [(layer.lstat, ()), (layer.open, (os.O_RDONLY,)),
                       (layer.getxattr, ("user.x",)), (layer.unlink, ()),
                       (layer.mkdir, (0o755,))]:
        with pytest.raises(NotADirectoryError):
            call("/link/secret", *args)
    with pytest.raises(NotADirectoryError):
        layer.dir("/link")
    with pytest.raises(NotADirectoryError):
        layer.scandir("/link/sub")
    assert not layer.exists("/link/secret")
    # The symlink itself is an entry like any other.
    assert layer.readlink("/link") == str(outside)
    assert sorted(os.listdir(outside)) == ["secret", "sub"]
    assert "/link" not in layer._dirfds


def test_union_over_symlinked_lower_component(tmp_path):
    """A lower directory over a symlink in the layer below: lookups below
    it never reach the symlink's target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret\n")
    l0, l1, upper, work = (tmp_path / n for n in ("l0", "l1", "upper", "work"))
    for d in (l0, l1, upper, work):
        d.mkdir()
    (l0 / "mixed").mkdir()
    (l0 / "mixed" / "a").write_text("a\n")
    os.symlink(outside, l1 / "mixed")
    u = Union([str(l0), str(l1)], str(upper), str(work))
    assert sorted(n for n, _, _ in u.listdir("/mixed")) == ["a"]
    with pytest.raises(FileNotFoundError):
        u.lstat("/mixed/secret")
    u.rename("/mixed", "/moved")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_paths_longer_than_path_max(tmp_path):
    """Create, write, read, rename, list, chmod, xattr, remove at a depth
    no absolute path reaches."""
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    # A deep lower tree, built relative to descriptors.
    fd = _deep_dir(lower)
    with open(os.open("lowfile", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
        f.write("lower\n")
    os.mkdir("sub", dir_fd=fd)
    os.close(fd)
    deep = deep_path()
    assert len(lower.as_posix() + deep) > os.pathconf("/", "PC_PATH_MAX")

    u = Union([str(lower)], str(upper), str(work))
    fd = u.open(deep + "/lowfile", os.O_RDWR | os.O_APPEND)        # copy-up
    os.write(fd, b"more\n")
    os.close(fd)
    u.chmod(deep + "/lowfile", 0o600)
    u.setxattr(deep + "/lowfile", "user.x", b"1", 0)
    assert u.getxattr(deep + "/lowfile", "user.x") == b"1"
    u.rename(deep + "/sub", deep + "/sub2")                          # a lower dir
    u.mkdir(deep + "/new", 0o755)
    fd = u.create(deep + "/new/f", 0o644, os.O_WRONLY)
    os.write(fd, b"new\n")
    os.close(fd)
    u.rename(deep + "/new", deep + "/new2")                          # an upper dir
    assert sorted(n for n, _, _ in u.listdir(deep)) == ["lowfile", "new2", "sub2"]
    fd = u.open(deep + "/lowfile", os.O_RDONLY)
    assert os.read(fd, 100) == b"lower\nmore\n"
    os.close(fd)
    st, _, _ = u.lstat(deep + "/lowfile")
    assert st.st_mode & 0o777 == 0o600
    fd = u.open(deep + "/new2/f", os.O_RDONLY)
    assert os.read(fd, 100) == b"new\n"
    os.close(fd)
    u.unlink(deep + "/new2/f")
    u.rmdir(deep + "/new2")
    u.unlink(deep + "/lowfile")
    u.rmdir(deep + "/sub2")
    assert u.listdir(deep) == []
    assert os.listdir(work / "unionfs-work") == []


def test_upper_descriptors_follow_renames_and_removals(tmp_path):
    """A cached descriptor of an upper directory never answers for a path
    after that directory moved or went away."""
    upper_dir, lower_dir, work = (tmp_path / n for n in ("upper", "lower", "work"))
    for d in (upper_dir, lower_dir, work):
        d.mkdir()
    u = Union([str(lower_dir)], str(upper_dir), str(work))
    u.mkdir("/a", 0o755)
    u.mkdir("/a/b", 0o755)
    fd = u.create("/a/b/f", 0o644, os.O_WRONLY)
    os.close(fd)
    assert u.upper.dir("/a/b") is not None        # cached now
    u.rename("/a", "/x")
    with pytest.raises(FileNotFoundError):
        u.lstat("/a/b/f")
    assert u.lstat("/x/b/f")[0].st_size == 0
    u.mkdir("/a", 0o755)
    u.mkdir("/a/b", 0o755)
    assert u.listdir("/a/b") == []             # not /x/b through a stale fd
    u.unlink("/x/b/f")
    u.rmdir("/x/b")
    u.mkdir("/x/b", 0o755)
    fd = u.create("/x/b/g", 0o644, os.O_WRONLY)
    os.close(fd)
    assert os.listdir(upper_dir / "x" / "b") == ["g"]


def test_walk_raced_by_an_invalidation_is_not_cached(tmp_path, monkeypatch):
    """A descriptor opened while the upper changed is used, not kept (as
    lookups: the generation check)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    layer = Layer(tmp_path, 0, upper=True)
    real_open_dir = L.open_dir

    def racing(dir_fd, name):
        d = real_open_dir(dir_fd, name)
        layer.forget_dirs("/a", tree=True)      # another thread renamed /a
        return d

    monkeypatch.setattr(L, "open_dir", racing)
    assert os.path.samestat(os.stat(layer.dir("/a/b").fd), os.stat(tmp_path / "a" / "b"))
    assert layer._dirfds == {}


def test_cache_is_bounded_and_evicted_fds_stay_valid_while_held(tmp_path):
    for i in range(10):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_text(str(i))
    layer = Layer(tmp_path, 0)
    layer.max_dirfds = 4
    held = layer.dir("/d0")
    for i in range(1, 10):
        layer.dir(f"/d{i}")
    assert len(layer._dirfds) == 4 and "/d0" not in layer._dirfds
    # Evicted, but the holder's descriptor is still d0 (never closed and
    # handed out again under it).
    f = os.open("f", os.O_RDONLY, dir_fd=held)
    assert os.read(f, 10) == b"0"
    os.close(f)
    fd = held.fd
    del held
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


def test_lower_stack_shares_descriptors_with_the_budget(tmp_path):
    dirs = []
    for i in range(3):
        d = tmp_path / f"l{i}"
        d.mkdir()
        dirs.append(str(d))
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    u = Union(dirs, str(tmp_path / "upper"), str(tmp_path / "work"))
    total = sum(layer.max_dirfds for layer in u.stack.layers)
    assert total <= max(L.DIRFD_BUDGET, L.MIN_DIRFDS * len(u.stack.layers))


@pytest.mark.parametrize("thread_cwd", [False, True])
def test_xattrs_by_proc_path_or_thread_cwd(tmp_path, monkeypatch, thread_cwd):
    """Both ways to reach an entry's xattrs (layers.xattr_call) name the
    entry itself, at any depth, and leave every thread's cwd as it was."""
    import threading
    monkeypatch.setattr(L, "thread_cwd", thread_cwd)
    monkeypatch.setattr(L, "_cwd", threading.local())
    fd = _deep_dir(tmp_path)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.symlink("f", "link", dir_fd=fd)
    os.close(fd)
    layer = Layer(tmp_path, 0, upper=True)
    deep = deep_path()
    cwd = os.getcwd()
    seen = []

    def work():
        layer.setxattr(deep + "/f", "user.a", b"1")
        seen.append((layer.getxattr(deep + "/f", "user.a"), layer.listxattr(deep + "/f"),
                     layer.listxattr(deep + "/link"), os.getcwd()))
        layer.removexattr(deep + "/f", "user.a")
        seen.append(layer.listxattr(deep + "/f"))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [(b"1", ["user.a"], [], cwd), []]
    work()                                  # and on this thread
    assert seen[2:] == [(b"1", ["user.a"], [], cwd), []]
    assert os.getcwd() == cwd
