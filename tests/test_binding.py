"""What the libfuse binding brings, through real mounts: the library in use,
renameat2 flags (compared with kernel overlayfs), directory listings the kernel caches, and entries that
READDIRPLUS hands to the kernel (each one a lookup the daemon must count).

``make test`` runs this file and test_mount.py a second time with
``UNIONFS_LIBFUSE=2`` (the fallback binding); tests of what only libfuse 3
can do skip there, saying so.
"""

import ctypes
import errno
import os

import pytest

from conftest import FUSE_UNIONFS, requires_fuse, requires_root, run

pytestmark = requires_fuse

from unionfs.osutil import RENAME_EXCHANGE, RENAME_NOREPLACE
from unionfs.osutil import rename2 as renameat2


def binding_in_use():
    """The binding ``fuse-unionfs --version`` names (and the libfuse version
    after it, for a libfuse binding)."""
    r = run([FUSE_UNIONFS, "--version"])
    assert r.returncode == 0, r.stderr
    named = [x.split()[-1] for x in r.stdout.splitlines() if x.startswith("FUSE binding version ")]
    assert len(named) == 1, r.stdout
    lib = [x.split()[-1] for x in r.stdout.splitlines() if x.startswith("FUSE library version ")]
    return named[0], (lib[0] if lib else None)


def test_binding_is_the_one_asked_for():
    want = os.environ.get("UNIONFS_LIBFUSE")
    name, version = binding_in_use()
    if want:
        assert name == f"libfuse{want}" and version.split(".")[0] == want
    else:
        # /dev/fuse is usable wherever these tests run (requires_fuse): the
        # daemon speaks the protocol itself, with no library.
        assert name == "devfuse" and version is None


def test_bad_library_choice_is_one_line(layers):
    env = dict(os.environ, UNIONFS_LIBFUSE="4")
    r = run([FUSE_UNIONFS, "-o", layers.options(), str(layers.mnt)], env=env)
    assert r.returncode != 0
    assert r.stderr.strip() == "fuse-unionfs: UNIONFS_LIBFUSE=4: must be 2 or 3", r.stderr
    assert not os.path.ismount(layers.mnt)


needs_libfuse3 = pytest.mark.skipif(
    os.environ.get("UNIONFS_LIBFUSE") == "2",
    reason="libfuse 2 (protocol 7.19) cannot pass renameat2 flags")


@needs_libfuse3
def test_rename_noreplace(layers, mounted):
    l0, l1 = layers.lowers
    (l1 / "a").write_text("A")
    (l1 / "b").write_text("B")
    (l0 / "gone").write_text("G")
    mnt = mounted()
    with pytest.raises(OSError) as e:
        renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    assert (mnt / "a").read_text() == "A" and (mnt / "b").read_text() == "B"
    # A whited-out name is free.
    os.unlink(mnt / "gone")
    renameat2(mnt / "a", mnt / "gone", RENAME_NOREPLACE)
    assert (mnt / "gone").read_text() == "A"
    assert not (mnt / "a").exists()
    assert sorted(os.listdir(mnt)) == ["b", "gone"]
    with pytest.raises(OSError) as e:
        renameat2(mnt / "b", mnt / "gone", RENAME_NOREPLACE | RENAME_EXCHANGE)
    assert e.value.errno == errno.EINVAL
    assert (mnt / "b").read_text() == "B" and (mnt / "gone").read_text() == "A"


def _exchange_layers(lowers):
    l0, l1 = lowers
    for d in ("merged", "lowdir", "p", "q"):
        (l1 / d).mkdir()
    (l1 / "merged" / "from-l1").write_text("1")
    (l0 / "merged").mkdir()
    (l0 / "merged" / "from-l0").write_text("0")
    (l1 / "merged" / "hidden").write_text("h")
    (l1 / "lowdir" / "inside").write_text("i")
    (l1 / "lowfile").write_text("lower file")
    (l0 / "topfile").write_text("top file")
    (l1 / "p" / "x").write_text("px")
    (l1 / "q" / "y").mkdir()
    (l1 / "q" / "y" / "deep").write_text("d")
    (l1 / "target").mkdir()
    (l1 / "target" / "below").write_text("must stay hidden")


def _exchange_ops(mnt):
    """The same steps on any mount; returns what each step answered."""
    out = []

    def step(fn):
        try:
            fn()
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno])

    step(lambda: os.unlink(mnt / "merged" / "hidden"))
    step(lambda: (mnt / "newfile").write_text("new"))
    step(lambda: os.mkdir(mnt / "newdir"))
    step(lambda: (mnt / "newdir" / "n").write_text("n"))
    step(lambda: renameat2(mnt / "lowfile", mnt / "newfile", RENAME_EXCHANGE))
    step(lambda: renameat2(mnt / "merged", mnt / "topfile", RENAME_EXCHANGE))
    step(lambda: renameat2(mnt / "newdir", mnt / "target", RENAME_EXCHANGE))
    step(lambda: renameat2(mnt / "p" / "x", mnt / "q" / "y", RENAME_EXCHANGE))
    step(lambda: renameat2(mnt / "lowdir", mnt / "nothing", RENAME_EXCHANGE))
    step(lambda: renameat2(mnt / "lowdir", mnt / "lowdir" / "inside", RENAME_EXCHANGE))
    step(lambda: (mnt / "topfile" / "from-l0").write_text("changed after"))
    return out


@needs_libfuse3
@requires_root
@pytest.mark.parametrize("fmt", ["overlay", "oci"])
def test_rename_exchange_as_kernel_overlayfs(tmp_path, mounter, fmt):
    """RENAME_EXCHANGE of files and directories from every layer: the same
    answers and the same tree as kernel overlayfs (redirect_dir=on), and
    an upper that kernel overlayfs reads back as the same tree."""
    from conftest import Layers
    from test_mount import tree_of

    ours_layers = Layers(tmp_path / "u")
    _exchange_layers(ours_layers.lowers)
    mnt = mounter.mount(ours_layers, extra=f"whiteout={fmt}")
    ours = _exchange_ops(mnt)
    our_tree = tree_of(mnt)

    k = Layers(tmp_path / "k")
    _exchange_layers(k.lowers)
    lower = ":".join(map(str, k.lowers))
    r = run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={k.upper},workdir={k.work},redirect_dir=on",
             str(k.mnt)])
    if r.returncode != 0:
        pytest.skip(f"kernel overlayfs unavailable: {r.stderr.strip()}")
    try:
        theirs = _exchange_ops(k.mnt)
        their_tree = tree_of(k.mnt)
    finally:
        run(["umount", str(k.mnt)])
    assert ours == theirs
    assert our_tree == their_tree
    assert our_tree["target/n"] == ("f", b"n")
    assert "target/below" not in our_tree

    mounter.umount(mnt)
    if fmt == "overlay":
        kwork = tmp_path / "kwork"
        kwork.mkdir()
        lower = ":".join(map(str, ours_layers.lowers))
        r = run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lower},upperdir={ours_layers.upper},workdir={kwork}",
                 str(mnt)])
        assert r.returncode == 0, r.stderr
        try:
            assert tree_of(mnt) == our_tree
        finally:
            run(["umount", str(mnt)])


def test_listings_follow_every_change(layers, mounted):
    """Listings large enough to take several READDIR replies, read again
    after each kind of change: what the kernel keeps must never be stale."""
    l0, l1 = layers.lowers
    (l1 / "d").mkdir()
    (l0 / "d").mkdir()
    for i in range(400):
        (l1 / "d" / f"low-{i:03d}-{'x' * 40}").write_text(str(i))
    for i in range(0, 400, 7):
        (l0 / "d" / f"low-{i:03d}-{'x' * 40}").write_text("top")
    (l1 / "e").mkdir()
    mnt = mounted()
    d = mnt / "d"
    low = [f"low-{i:03d}-{'x' * 40}" for i in range(400)]
    want = set(low)

    def check():
        for _ in range(2):                      # from the daemon, then cached
            names = os.listdir(d)
            assert len(names) == len(set(names)), "a name listed twice"
            assert set(names) == want
            with os.scandir(d) as it:
                assert {e.name for e in it} == want

    check()
    (d / "new").write_text("n")
    want.add("new")
    check()
    os.unlink(d / low[7])
    want.discard(low[7])
    check()
    os.rename(d / low[100], d / "renamed")
    want.discard(low[100])
    want.add("renamed")
    check()
    os.rename(d / "renamed", mnt / "e" / "moved")
    want.discard("renamed")
    check()
    assert os.listdir(mnt / "e") == ["moved"]
    os.mkdir(d / "sub")
    os.link(d / "new", d / "hard")
    os.symlink("new", d / "sym")
    want |= {"sub", "hard", "sym"}
    check()
    os.rmdir(d / "sub")
    want.discard("sub")
    check()


@requires_root
def test_entries_from_listings_survive_the_kernel_forgetting_them(layers, mounted):
    """READDIRPLUS gives the kernel an entry (a lookup) for every name. Once
    the kernel drops its caches and forgets them, every file must still be
    there with the same attributes: a miscounted lookup would lose the
    inode (ESTALE) or keep serving a stale one."""
    l0, l1 = layers.lowers
    for top in ("a", "b"):
        for layer in (l0, l1):
            (layer / top).mkdir()
        for i in range(300):
            (l1 / top / f"f{i}").write_text(f"{top}{i}")
    mnt = mounted()
    before = {}
    for top in ("a", "b"):
        with os.scandir(mnt / top) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                before[f"{top}/{e.name}"] = (st.st_size, st.st_mode)
    assert len(before) == 600
    os.rename(mnt / "a" / "f1", mnt / "a" / "f1-renamed")
    (mnt / "b" / "f2").write_text("changed")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")                           # dentries and inodes: FORGETs
    before["a/f1-renamed"] = before.pop("a/f1")
    before["b/f2"] = (len("changed"), before["b/f2"][1])
    after = {}
    for top in ("a", "b"):
        for name in os.listdir(mnt / top):
            st = os.lstat(mnt / top / name)
            after[f"{top}/{name}"] = (st.st_size, st.st_mode)
    assert after == before
    assert (mnt / "a" / "f1-renamed").read_text() == "a1"
    assert (mnt / "b" / "f2").read_text() == "changed"
    assert (mnt / "b" / "f299").read_text() == "b299"


def test_listings_kept_ready_are_bounded(tmp_path, monkeypatch):
    """The encoded listings kept for readdir are bounded by their total
    entries (no mount: the adapter over a Union)."""
    from unionfs import fs
    monkeypatch.setattr(fs, "MAX_LISTED_ENTRIES", 100)
    adapter = _adapter_over(tmp_path, {f"d{i}": [f"f{j}" for j in range(40)]
                                       for i in range(5)})
    for i in range(5):
        listing = adapter._current_listing(f"/d{i}")
        assert len(listing.entries) == 42
        assert adapter._listed <= 100
        assert adapter._current_listing(f"/d{i}") is listing    # unchanged dir


def test_readdir_offsets_are_name_hashes(tmp_path):
    """Offsets are a name's hash in every version of a directory, so resuming
    at one skips exactly the names before it; names with colliding hashes
    share one offset and are never split."""
    from unionfs import fs
    names = [f"n{i}".encode() for i in range(3000)]
    a = fs.Listing(7, [(n, 0o100000, i) for i, n in enumerate(names)])
    assert [e[0] for e in a.entries[:2]] == [b".", b".."] and a.offs[:2] == [1, 2]
    assert a.offs == sorted(a.offs) and all(3 <= o < 2**31 for o in a.offs[2:])
    assert sorted(e[0] for e in a.entries[2:]) == sorted(names)
    # Another version: a third of the names gone, others added.
    b = fs.Listing(7, [(n, 0o100000, 0) for n in names[1000:] + [b"new%d" % i for i in range(500)]])
    for k in (0, 1, 2, 3, 500, 1500, len(a.offs) - 1):
        off = a.offs[k]
        before = {e[0] for e in a.entries[:k + 1]}
        after = {e[0] for e in b.entries[b.start(off):]}
        kept = set(names[1000:])
        assert kept - before <= after and not (kept & before & after)


def test_names_sharing_an_offset_go_into_one_reply(tmp_path, monkeypatch):
    """Two names whose hashes collide share an offset: a reader resumed
    there would skip both, so a reply holds both or neither."""
    from unionfs import fs
    from unionfs.binding import common
    real = fs.name_offset
    monkeypatch.setattr(fs, "name_offset", lambda n: 1000 if n in (b"p", b"q") else real(n))
    c = fs.Listing(1, [(n, 0o100000, 0) for n in (b"p", b"q", b"x" * 100)])
    i = c.offs.index(1000)
    assert [e[0] for e in c.entries[i:i + 2]] == [b"p", b"q"]
    assert c.run_end(i) == i + 2 and c.start(1000) == i + 2

    adapter = _adapter_over(tmp_path, {"d": []})
    buf = ctypes.create_string_buffer(4096)
    sizes = [common.direntry_size(e[0]) for e in c.entries]
    # Room for everything before the pair and one of the two: the pair waits.
    room = sum(sizes[:i]) + sizes[i]
    used = adapter._fill_entries(None, ctypes.addressof(buf), room, c, 0, "/d", False, [])
    assert used == sum(sizes[:i])
    used = adapter._fill_entries(None, ctypes.addressof(buf), room + sizes[i + 1], c, 0,
                                 "/d", False, [])
    assert used == sum(sizes[:i + 2])


def test_inode_numbers_in_listings_follow_copy_up(layers, mounted):
    """A listing read after a copy-up, even one the kernel had cached,
    carries the number stat shows, as kernel overlayfs's does."""
    l0, l1 = layers.lowers
    (l1 / "d" / "sub").mkdir(parents=True)
    for n in ("a", "b", "c"):
        (l1 / "d" / n).write_text(n)
        (l1 / "d" / "sub" / n).write_text(n)
    mnt = mounted()

    def check(d):
        for _ in range(2):
            with os.scandir(d) as it:
                for e in it:
                    assert e.inode() == os.lstat(e.path).st_ino, e.path

    check(mnt / "d")
    check(mnt / "d" / "sub")
    os.chmod(mnt / "d" / "a", 0o600)                 # copy-up of a file
    (mnt / "d" / "b").open("a").close()              # ... by an open for writing
    check(mnt / "d")
    os.rename(mnt / "d" / "sub", mnt / "d" / "moved")  # a lower tree, copied whole
    check(mnt / "d")
    check(mnt / "d" / "moved")


def test_directory_offsets_fit_in_31_bits(layers, mounted):
    """32-bit programs (i386/armhf images) read directories with a 32-bit
    off_t: every offset telldir() returns must stay below 2**31."""
    l0, l1 = layers.lowers
    (l1 / "d").mkdir()
    for i in range(300):
        (l1 / "d" / f"f{i}").write_text("x")
    mnt = mounted()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir64.restype = ctypes.c_void_p
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    for n in range(3):                    # several listing versions
        (mnt / "d" / f"new{n}").write_text("n")
        dirp = libc.opendir(os.fsencode(mnt / "d"))
        assert dirp
        offsets = []
        try:
            while libc.readdir64(dirp):
                offsets.append(libc.telldir(dirp))
        finally:
            libc.closedir(dirp)
        assert len(offsets) == 300 + 2 + n + 1
        assert all(0 < o < 2 ** 31 for o in offsets), max(offsets)


def _adapter_over(tmp_path, dirs):
    """The FUSE adapter (no mount) over one lower layer holding ``dirs``
    ({directory: file names}), an empty upper and a work dir."""
    from unionfs import fs
    from unionfs.union import Union
    low, up, work = (tmp_path / n for n in ("low", "up", "work"))
    for d in (low, up, work):
        d.mkdir()
    for d, names in dirs.items():
        (low / d).mkdir()
        for n in names:
            (low / d / n).write_text(n)
    return fs.UnionFS(Union([str(low)], str(up), str(work)))


@pytest.mark.parametrize("reply_result", [0, -errno.ENOENT])
def test_lookups_of_undelivered_replies_are_dropped(tmp_path, monkeypatch, reply_result):
    """A reply the kernel no longer takes (its request was interrupted:
    libfuse returns -ENOENT) carries lookups the kernel will never forget;
    the daemon takes them back itself, as libfuse's own high-level API does.
    No mount: the adapter with libfuse's reply calls replaced."""
    from unionfs import fs
    from unionfs.binding import common
    names = [f"f{i}" for i in range(5)]
    adapter = _adapter_over(tmp_path, {"d": names})
    monkeypatch.setattr(fs.ll, "reply_open", lambda req, fi: 0)

    def counts():
        # an entry in compact form (a node id, not an Inode) is looked up once
        return {p: i.nlookup if isinstance(i, fs.Inode) else 1
                for p, i in adapter._by_path.items() if p != "/"}

    monkeypatch.setattr(fs.ll, "reply_entry", lambda req, e: reply_result)
    adapter.lookup(None, common.ROOT_ID, b"d")
    assert counts() == ({} if reply_result else {"/d": 1})

    if not hasattr(fs.ll, "direntplus_size"):
        pytest.skip("libfuse 2 has no READDIRPLUS: only the lookup half of this test applies")
    monkeypatch.setattr(fs.ll, "reply_entry", lambda req, e: 0)
    adapter.lookup(None, common.ROOT_ID, b"d")
    d = adapter._by_path["/d"]
    before = counts()
    fi = ctypes.pointer(fs.ll.fuse_file_info())
    adapter.opendir(None, d.nodeid, fi)
    sent = []
    monkeypatch.setattr(fs.ll, "reply_buf", lambda req, buf, n: sent.append(n) or reply_result)
    adapter.readdirplus(None, d.nodeid, 4096, 0, fi)
    assert sent and sent[0] > 0
    assert counts() == before | ({} if reply_result else {f"/d/{n}": 1 for n in names})

    # An error while the reply is filled: no entry stays counted either.
    before = counts()
    real, calls = fs.ll.add_direntry_plus, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected")
        return real(*args)
    monkeypatch.setattr(fs.ll, "add_direntry_plus", failing)
    monkeypatch.setattr(fs.ll, "reply_buf", lambda req, buf, n: 0)
    with pytest.raises(RuntimeError):
        adapter.readdirplus(None, d.nodeid, 4096, 0, fi)
    assert counts() == before
