"""Merged paths longer than PATH_MAX, side by side with kernel overlayfs.

The same two lower layers are built twice -- the lower one already holding
a tree more than 5000 bytes deep, made with fd-relative calls (no path that
long can be passed to a syscall) -- and kernel overlayfs is mounted on one
copy, unionfs on the other (each whiteout format). One scenario runs on
each mount, also relative to directory descriptors, as a program working
that deep must: create a deeper tree, write, read, rename (a file, an upper
directory, and a lower directory, which copies it up), list, chmod, set and
read xattrs, remove lower entries (whiteouts) and remove the new tree.
Every step's result (or errno) and the final merged tree must be the same
on both; after a unionfs remount the tree still reads the same.
"""

import contextlib
import errno
import os
import stat

import pytest

from conftest import Layers, requires_fuse, requires_root
from reliability_helpers import (alive, daemon_pid, kernel_overlay_available, mount_cli,
                                 mount_kernel_overlay, quick_unmount, unmount_any)

pytestmark = [requires_fuse, requires_root, pytest.mark.fuse,
              pytest.mark.skipif(not kernel_overlay_available(),
                                 reason="kernel overlayfs not available")]

PATH_MAX = os.pathconf("/", "PC_PATH_MAX")
COMP = "c" * 200                    # one directory name
DEPTH = 26                          # 26 * 201 bytes: deeper than 5000 bytes
assert DEPTH * (len(COMP) + 1) > max(5000, PATH_MAX)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def opened(dir_fd, *names):
    """An fd of directory ``dir_fd``/names..., opened one name at a time
    (``dir_fd`` may be a path: then the directory at that path)."""
    fd = os.open(dir_fd, _DIR) if isinstance(dir_fd, (str, os.PathLike)) else os.dup(dir_fd)
    try:
        for name in names:
            nfd = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def write_at(dir_fd, name, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    fd = os.open(name, flags | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_at(dir_fd, name):
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def build_lower(root):
    """The lower layer's deep tree: DEPTH levels of COMP, holding at the
    bottom files, a directory with files (renamed later: a copy-up of a
    directory at that depth), and names removed later."""
    with opened(root) as top:
        parent = top
        for _ in range(DEPTH):
            os.mkdir(COMP, dir_fd=parent)
            parent = os.open(COMP, _DIR, dir_fd=parent)
        fd = parent
        write_at(fd, "lowfile", b"lower data\n")
        write_at(fd, "gone", b"to be removed\n")
        os.mkdir("emptydir", dir_fd=fd)
        os.mkdir("sub", dir_fd=fd)
        with opened(fd, "sub") as sub:
            write_at(sub, "inside", b"inside sub\n")
            os.mkdir("nested", dir_fd=sub)
            with opened(sub, "nested") as nested:
                write_at(nested, "leaf", b"leaf\n")
        os.setxattr(f"/proc/self/fd/{fd}/lowfile", "user.low", b"1")
        # (The intermediate fds go with the test process; closing them one
        # by one would only add lines.)


def attempt(fn, *args, **kw):
    """0 if ``fn`` succeeds, else its errno name: what a program observes."""
    try:
        fn(*args, **kw)
        return 0
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def user_xattrs(path):
    return sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))


def scenario(mnt):
    """Run the deep operations on mount ``mnt``; return what was observed."""
    seen = {}
    with opened(mnt) as top:
        # Into the lower's deep tree, and a new tree beside it.
        with opened(top, *[COMP] * DEPTH) as deep:
            seen["lower listing"] = sorted(os.listdir(deep))
            seen["lower read"] = read_at(deep, "lowfile")
            seen["lower xattrs"] = user_xattrs(f"/proc/self/fd/{deep}/lowfile")
            # A write to a lower file: copy-up at depth.
            write_at(deep, "lowfile", b"appended\n", os.O_WRONLY | os.O_APPEND)
            seen["after append"] = read_at(deep, "lowfile")
            # chmod of a lower file and of a lower directory.
            os.chmod("lowfile", 0o600, dir_fd=deep)
            os.chmod("emptydir", 0o700, dir_fd=deep)
            seen["modes"] = [stat.S_IMODE(os.stat(n, dir_fd=deep, follow_symlinks=False).st_mode)
                             for n in ("lowfile", "emptydir")]
            # xattrs on a deep lower directory and file.
            os.setxattr(f"/proc/self/fd/{deep}/sub", "user.deep", b"dir",
                        follow_symlinks=False)
            os.setxattr(f"/proc/self/fd/{deep}/lowfile", "user.deep", b"file",
                        follow_symlinks=False)
            seen["xattr get"] = [os.getxattr(f"/proc/self/fd/{deep}/{n}", "user.deep",
                                             follow_symlinks=False) for n in ("sub", "lowfile")]
            os.removexattr(f"/proc/self/fd/{deep}/lowfile", "user.low", follow_symlinks=False)
            seen["xattr list"] = user_xattrs(f"/proc/self/fd/{deep}/lowfile")
            # Rename a lower directory (its contents come along) and a file.
            os.rename("sub", "sub2", src_dir_fd=deep, dst_dir_fd=deep)
            with opened(deep, "sub2", "nested") as nested:
                seen["renamed dir read"] = read_at(nested, "leaf")
            seen["renamed dir listing"] = sorted(os.listdir(
                f"/proc/self/fd/{deep}/sub2"))
            seen["old dir"] = attempt(os.stat, "sub", dir_fd=deep)
            os.rename("lowfile", "movedfile", src_dir_fd=deep, dst_dir_fd=deep)
            # Remove lower entries: whiteouts at depth.
            os.unlink("gone", dir_fd=deep)
            os.rmdir("emptydir", dir_fd=deep)
            seen["after removals"] = sorted(os.listdir(deep))
            seen["removed"] = [attempt(os.stat, n, dir_fd=deep, follow_symlinks=False)
                               for n in ("gone", "emptydir")]
            # A new name where a whiteout is.
            write_at(deep, "gone", b"back again\n")
            seen["recreated"] = read_at(deep, "gone")

        # A new tree, deeper still, created through the mount.
        with opened(top, *[COMP] * DEPTH) as fd:
            fd = os.dup(fd)
            try:
                for _ in range(DEPTH):
                    os.mkdir("n" * 200, dir_fd=fd)
                    nfd = os.open("n" * 200, _DIR, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                write_at(fd, "new", b"new data\n")
                os.symlink("new", "link", dir_fd=fd)
                os.mkdir("updir", dir_fd=fd)
                write_at(fd, "updir-file", b"u\n")
                os.rename("updir-file", "updir/file", src_dir_fd=fd, dst_dir_fd=fd)
                os.rename("updir", "updir2", src_dir_fd=fd, dst_dir_fd=fd)
                seen["new read"] = (read_at(fd, "new"), read_at(fd, "link"),
                                    os.readlink("link", dir_fd=fd))
                seen["new listing"] = sorted(os.listdir(fd))
                os.chmod("new", 0o640, dir_fd=fd)
                os.setxattr(f"/proc/self/fd/{fd}/new", "user.n", b"v", follow_symlinks=False)
                seen["new attrs"] = (stat.S_IMODE(os.stat("new", dir_fd=fd).st_mode),
                                     os.getxattr(f"/proc/self/fd/{fd}/new", "user.n"))
            finally:
                os.close(fd)
        seen["tree"] = tree(top)
        # Remove the new tree, bottom up.
        with opened(top, *[COMP] * DEPTH) as deep:
            remove_new_tree(deep)
            seen["after rmtree"] = sorted(os.listdir(deep))
        seen["final tree"] = tree(top)
    return seen


def remove_new_tree(deep):
    fds = [os.dup(deep)]
    try:
        for _ in range(DEPTH):
            fds.append(os.open("n" * 200, _DIR, dir_fd=fds[-1]))
        bottom = fds[-1]
        for name in ("new", "link"):
            os.unlink(name, dir_fd=bottom)
        fds.append(os.open("updir2", _DIR, dir_fd=bottom))
        os.unlink("file", dir_fd=fds[-1])
        os.rmdir("updir2", dir_fd=bottom)
        for parent in reversed(fds[:DEPTH]):
            os.rmdir("n" * 200, dir_fd=parent)
    finally:
        for fd in fds:
            os.close(fd)


def tree(dir_fd, depth=0):
    """{name: description} of everything below ``dir_fd``, nested."""
    out = {}
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        st = e.stat(follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if e.is_dir(follow_symlinks=False):
            with opened(dir_fd, e.name) as sub:
                out[e.name] = ("d", mode, tree(sub, depth + 1))
        elif e.is_symlink():
            out[e.name] = ("l", os.readlink(e.name, dir_fd=dir_fd))
        else:
            out[e.name] = ("f", mode, read_at(dir_fd, e.name))
    return out


@pytest.fixture
def pair(tmp_path):
    """Two identical stacks: ``kernel`` and ``unionfs``."""
    stacks = {name: Layers(tmp_path / name) for name in ("kernel", "unionfs")}
    for layers in stacks.values():
        build_lower(layers.lowers[1])
        (layers.lowers[0] / "top").write_text("top layer\n")
    try:
        yield stacks
    finally:
        for layers in stacks.values():
            unmount_any(layers.mnt)


@pytest.mark.parametrize("whiteout", ["overlay", "oci"])
def test_tree_deeper_than_path_max_as_kernel_overlayfs(pair, whiteout):
    kernel = mount_kernel_overlay(pair["kernel"])
    try:
        want = scenario(kernel)
    finally:
        unmount_any(kernel)
    layers = pair["unionfs"]
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)
    got = scenario(mnt)
    for key in want:
        assert got[key] == want[key], key
    assert alive(pid)
    quick_unmount(mnt)
    # What the upper holds reads back the same after a remount.
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    with opened(mnt) as top:
        assert tree(top) == want["final tree"]
    quick_unmount(mnt)
    assert os.listdir(layers.work / "unionfs-work") == []
