"""The node table of fs.py, in-process (no mount): which node id a name
gets once lower hard links are copied up, and who closes a directory
descriptor after a fork."""

import errno
import gc
import os

import pytest

from unionfs import fs, layers
from unionfs.binding import common
from unionfs.union import Union


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A UnionFS over one lower holding hard links a and b, its replies
    recorded instead of sent to a kernel."""
    for n in ("low", "up", "work"):
        (tmp_path / n).mkdir()
    (tmp_path / "low" / "a").write_text("x")
    os.link(tmp_path / "low" / "a", tmp_path / "low" / "b")
    got = []
    monkeypatch.setattr(fs.ll, "reply_entry", lambda req, e: got.append(e.ino) or 0)
    monkeypatch.setattr(fs.ll, "reply_err", lambda req, err: 0)
    monkeypatch.setattr(fs.ll, "reply_open", lambda req, fi: 0)
    monkeypatch.setattr(fs.ll, "reply_none", lambda req: None)
    monkeypatch.setattr(fs.ll, "inval_inode", lambda *a, **k: 0, raising=False)
    monkeypatch.setattr(fs.ll, "inval_entry", lambda *a, **k: 0, raising=False)
    u = fs.UnionFS(Union([str(tmp_path / "low")], str(tmp_path / "up"), str(tmp_path / "work")))

    def lookup(name):
        u.lookup(None, common.ROOT_ID, name.encode())
        return got[-1]
    u.lookup_name = lookup
    u.got = got
    return u


def test_a_link_through_a_replaced_node_can_be_opened(served):
    """Names of a lower hard link looked up before its copy-up: the later
    one's node is replaced (the kernel is told to forget it); a link made
    through that old node must not hand the file to it, or the new name
    could never be opened (ESTALE at every try)."""
    a, b = served.lookup_name("a"), served.lookup_name("b")
    served.union.chmod("/a", 0o640)     # copies up the hard link: b joins a
    assert served.lookup_name("b") == a
    served.link(None, b, common.ROOT_ID, b"bl")
    for _ in range(2):      # the kernel's open, and its retry after a new lookup
        node = served.lookup_name("bl")
        served.open(None, node, os.O_RDONLY)


def test_a_name_gone_before_its_join_does_not_fail_the_copy_up(served):
    """A name of the hard link removed between the copy-up and the table's
    update: the change that copied up succeeds."""
    served.lookup_name("a"), served.lookup_name("b")
    join = served._join

    def unlink_first(path, inode):
        if path == "/b":
            served.union.unlink("/b")
        return join(path, inode)
    served._join = unlink_first
    served.union.chmod("/a", 0o640)
    assert os.stat(served.union.upper.root + "/a").st_mode & 0o777 == 0o640


def test_a_forked_child_never_closes_its_parents_directory_descriptors(tmp_path):
    d = layers.open_dir(None, str(tmp_path))
    n = d.fd
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            del d
            gc.collect()
            os.fstat(n)         # still open: the parent's, not ours to close
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    del d
    gc.collect()
    with pytest.raises(OSError) as e:
        os.fstat(n)
    assert e.value.errno == errno.EBADF


def test_the_request_loop_ends_when_its_descriptor_is_no_longer_the_device(tmp_path):
    """Reading /dev/fuse never gives 0 bytes; a descriptor that does (its
    number was replaced, e.g. by /dev/null) ends the loop with an error
    instead of spinning on it forever."""
    import threading

    from unionfs.binding import devfuse
    u = fs.UnionFS(Union([str(tmp_path)], None, None))
    session = devfuse.Session(u.handlers(), passthrough=False)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        loop = threading.Thread(target=session.serve, args=(fd,), daemon=True)
        loop.start()
        loop.join(10)
        assert not loop.is_alive(), "the loop spins on a descriptor that reads empty"
        assert session.done.is_set() and session.error.errno == errno.EBADF
    finally:
        os.close(fd)


def test_an_open_failing_before_its_reply_keeps_no_descriptor(served, monkeypatch):
    """An open that fails after the file was opened (here: its name unlinked
    by another thread before the node learns its number) answers the error
    and closes what it opened: the kernel will never release it, and a
    later open of the unlinked node must not reopen a descriptor nobody
    holds."""
    with open(os.path.join(served.union.stack.lowers[0].root, "c"), "w") as f:
        f.write("c")
    node = served.lookup_name("c")
    before = set(os.listdir("/proc/self/fd"))

    def gone(path):
        raise FileNotFoundError(errno.ENOENT, "unlinked meanwhile", path)
    monkeypatch.setattr(served.union, "lstat", gone)
    with pytest.raises(OSError):
        served.open(None, node, os.O_RDONLY)
    assert not served._inode(node).fds
    assert set(os.listdir("/proc/self/fd")) <= before


def test_an_unlinked_node_is_never_reopened_through_a_reused_descriptor_number(
        served, monkeypatch):
    """An open of an unlinked node reopens a descriptor the daemon holds on
    its file (/proc/self/fd/N). A release of that descriptor on another
    thread meanwhile, and N given to another file, must not make the open
    hand out that other file."""
    import threading
    from types import SimpleNamespace
    low = served.union.stack.lowers[0].root
    with open(os.path.join(low, "c"), "w") as f:
        f.write("c")
    want = os.stat(os.path.join(low, "c")).st_ino
    opened = []
    monkeypatch.setattr(fs.ll, "reply_open", lambda req, fi: opened.append(fi.fh) or 0)
    node = served.lookup_name("c")
    served.open(None, node, os.O_RDONLY)
    held = opened[-1]
    served.unlink(None, common.ROOT_ID, b"c")
    assert served._inode(node).path is None

    picked, released = threading.Event(), threading.Event()
    real_open = os.open

    def slow_open(path, flags, *a, **kw):
        if str(path).startswith("/proc/self/fd/"):
            picked.set()
            released.wait(1)        # the other thread's turn, if it can take it
        return real_open(path, flags, *a, **kw)

    def release_and_reuse():
        picked.wait(10)
        served.release(None, node, SimpleNamespace(contents=SimpleNamespace(fh=held)))
        other = real_open("/dev/null", os.O_RDONLY)
        if other != held:
            os.dup2(other, held)    # the number now names another file
            os.close(other)
        released.set()

    monkeypatch.setattr(os, "open", slow_open)
    t = threading.Thread(target=release_and_reuse)
    t.start()
    try:
        served.open(None, node, os.O_RDONLY)
    finally:
        t.join(10)
        monkeypatch.setattr(os, "open", real_open)
        os.close(held)
    fd = opened[-1]
    try:
        assert os.fstat(fd).st_ino == want
    finally:
        os.close(fd)


def test_an_unlinked_node_is_reopened_for_writing_only_through_a_writable_descriptor(
        served, tmp_path):
    """A node can hold a descriptor of its lower file (opened for reading
    just before another open copied it up) after one of its upper copy.
    Reopened for writing once unlinked, it must be the upper copy: a lower
    layer is never written."""
    lower = os.open(os.path.join(served.union.stack.lowers[0].root, "a"), os.O_RDONLY)
    upper_copy = tmp_path / "copy"
    upper_copy.write_text("x")
    upper = os.open(upper_copy, os.O_RDWR)
    inode = fs.Inode(99, None, False)
    inode.fds = [upper, lower]      # the read of the lower file was answered last
    try:
        fd = served._reopen_unlinked(inode, os.O_WRONLY)
        try:
            assert os.fstat(fd).st_ino == os.fstat(upper).st_ino
        finally:
            os.close(fd)
    finally:
        os.close(lower)
        os.close(upper)
