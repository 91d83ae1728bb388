"""Commit, diff and save on a container upper written directly (no FUSE):
both whiteout formats, deterministic layers, and save/load round trips."""

import io
import json
import os
import stat
import tarfile

import pytest

from image_helpers import D, F, L, docker_archive, layer_tar, run_cli, sha, tree
from unionfs.image.store import Store

IS_ROOT = os.geteuid() == 0
BASE = layer_tar(D("etc"), F("etc/motd", b"hello\n"), F("etc/passwd", b"root\n"), D("app"),
                 F("app/a", b"a"), F("app/b", b"b"), D("app/sub"), F("app/sub/c", b"c"),
                 L("bin", "usr/bin"), D("keep"), F("keep/k", b"k"))


@pytest.fixture
def container(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "base.tar", [BASE], tags=["base:1"])
    assert run_cli("image", "load", "--store", store, "-q", tmp_path / "base.tar")[0] == 0
    s = Store(store)
    with s.locked():
        c = s.create_container("c1", s.resolve("base:1"))
    return s, c


def populate(upper: str, fmt: str):
    """A typical upper: a changed file, a new file with an xattr and a hardlink,
    a deleted file, and a replaced (opaque) directory, in whiteout format `fmt`."""
    os.makedirs(f"{upper}/etc")
    os.makedirs(f"{upper}/app")
    with open(f"{upper}/etc/motd", "wb") as f:
        f.write(b"changed\n")
    with open(f"{upper}/etc/new", "wb") as f:
        f.write(b"new\n")
    os.chmod(f"{upper}/etc/new", 0o600)
    os.setxattr(f"{upper}/etc/new", "user.note", b"hi")
    os.link(f"{upper}/etc/new", f"{upper}/etc/new-link")
    os.mkdir(f"{upper}/app/sub")
    with open(f"{upper}/app/sub/fresh", "wb") as f:
        f.write(b"fresh")
    if fmt == "overlay":
        os.mknod(f"{upper}/etc/passwd", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.mknod(f"{upper}/app/a", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.setxattr(f"{upper}/app/sub", "trusted.overlay.opaque", b"y")
    else:
        open(f"{upper}/etc/.wh.passwd", "wb").close()
        open(f"{upper}/app/.wh.a", "wb").close()
        open(f"{upper}/app/sub/.wh..wh..opq", "wb").close()
    for dirpath, dirnames, filenames in os.walk(upper, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (1_700_000_100, 1_700_000_100), follow_symlinks=False)


FORMATS = ["oci", pytest.param("overlay", marks=pytest.mark.skipif(not IS_ROOT, reason="mknod 0/0 needs root"))]

EXPECTED_DIFF = ["D /app/a", "C /app/sub", "D /app/sub/c", "A /app/sub/fresh", "C /app", "C /etc",
                 "C /etc/motd", "A /etc/new", "A /etc/new-link", "D /etc/passwd"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_diff(container, fmt):
    s, c = container
    populate(c.upper, fmt)
    rc, out, err = run_cli("diff", "--store", s.root, "c1")
    assert rc == 0, err
    assert sorted(out.splitlines()) == sorted(EXPECTED_DIFF)
    assert [l.split()[1] for l in out.splitlines()] == sorted(l.split()[1] for l in out.splitlines())
    # The upper dir itself: found as the container's upper, so same answer.
    assert run_cli("diff", "--store", s.root, c.upper)[1] == out
    # A plain upper dir with no known lowers: nothing can be a change.
    plain = os.path.join(os.path.dirname(c.path), "..", "plain-upper")
    os.rename(c.upper, plain)
    rc, out2, _ = run_cli("diff", "--store", s.root, plain)
    assert {l.split()[0] for l in out2.splitlines()} == {"A", "D"}
    lowers = ":".join(s.lowerdirs(s.resolve("base:1")))
    rc, out3, _ = run_cli("diff", "--store", s.root, plain, "--lowerdir", lowers)
    assert out3 == out


def layer_entries(s: Store, image_ref: str, index=-1):
    image = s.resolve(image_ref)
    with s.open_tar(image.layers[index]) as f:
        data = f.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers(), data


@pytest.mark.parametrize("fmt", FORMATS)
def test_commit_writes_an_oci_layer(container, fmt):
    s, c = container
    populate(c.upper, fmt)
    rc, out, err = run_cli("commit", "--store", s.root, "c1", "mine:1", "-m", "my change")
    assert rc == 0, err
    members, tar_bytes = layer_entries(s, "mine:1")
    names = [m.name for m in members]
    assert names == ["app", "app/.wh.a", "app/sub", "app/sub/.wh..wh..opq", "app/sub/fresh",
                     "etc", "etc/.wh.passwd", "etc/motd", "etc/new", "etc/new-link"]
    by = {m.name: m for m in members}
    assert by["etc/new"].mode == 0o600 and by["etc/new"].mtime == 1_700_000_100
    assert by["etc/new"].pax_headers.get("SCHILY.xattr.user.note") == "hi"
    assert by["etc/new-link"].islnk() and by["etc/new-link"].linkname == "etc/new"
    assert by["etc/.wh.passwd"].isreg() and by["etc/.wh.passwd"].size == 0
    assert not any("overlay" in k for m in members for k in m.pax_headers)
    assert all(m.uname == "" and m.gname == "" for m in members)
    image = s.resolve("mine:1")
    config = s.config(image)
    assert config["rootfs"]["diff_ids"] == [sha(BASE), sha(tar_bytes)]
    assert config["history"][-1]["created_by"] == "my change"
    assert config["created"] == "2023-11-14T22:15:00Z"   # newest mtime in the layer
    assert config["config"]["Cmd"] == ["/bin/sh"]        # the parent's config carries over


def test_commit_is_deterministic(container, tmp_path):
    s, c = container
    populate(c.upper, "oci")
    run_cli("commit", "--store", s.root, "c1", "one")
    run_cli("commit", "--store", s.root, "c1", "two")
    one, two = s.resolve("one"), s.resolve("two")
    assert one.id == two.id and one.layers == two.layers
    # And in another store, from an equal upper made separately.
    docker_archive(tmp_path / "b.tar", [BASE], tags=["base:1"])
    s2 = Store(tmp_path / "store2")
    run_cli("image", "load", "--store", s2.root, "-q", tmp_path / "b.tar")
    with s2.locked():
        c2 = s2.create_container("other", s2.resolve("base:1"))
    populate(c2.upper, "oci")
    run_cli("commit", "--store", s2.root, "other", "three")
    assert s2.resolve("three").id == one.id


def test_commit_then_save_and_reload_round_trip(container, tmp_path):
    s, c = container
    populate(c.upper, "oci")
    assert run_cli("commit", "--store", s.root, "c1", "mine:2")[0] == 0
    image = s.resolve("mine:2")
    for fmt in ("docker", "oci"):
        out = tmp_path / f"saved-{fmt}.tar"
        rc, _, err = run_cli("image", "save", "--store", s.root, "mine:2", "-o", out, "--format", fmt)
        assert rc == 0, err
        fresh = Store(tmp_path / f"fresh-{fmt}")
        rc, stdout, err = run_cli("image", "load", "--store", fresh.root, out)
        assert rc == 0, err
        assert stdout == "Loaded image: mine:2\n"
        again = fresh.resolve("mine:2")
        assert again.id == image.id
        for a, b in zip(image.layers, again.layers):
            assert a.diff_id == b.diff_id
            assert tree(s.layer_root(a.diff_id)) == tree(fresh.layer_root(b.diff_id))


def test_saved_archives_are_deterministic(container, tmp_path):
    s, _ = container
    for fmt in ("docker", "oci"):
        first, second = tmp_path / f"{fmt}-1.tar", tmp_path / f"{fmt}-2.tar"
        for out in (first, second):
            rc, _, err = run_cli("image", "save", "--store", s.root, "base:1", "-o", out, "--format", fmt)
            assert (rc, err) == (0, ""), err
        assert first.read_bytes() == second.read_bytes()


def test_docker_save_layout(container, tmp_path):
    s, _ = container
    rc, _, err = run_cli("image", "save", "--store", s.root, "base:1", "-o", tmp_path / "d.tar")
    assert (rc, err) == (0, ""), err
    with tarfile.open(tmp_path / "d.tar") as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["base:1"]
        layer = tf.extractfile(manifest[0]["Layers"][0]).read()
        assert sha(layer) == sha(BASE)  # uncompressed: its digest is the diff_id


def test_commit_errors(container, tmp_path):
    s, _ = container
    rc, _, err = run_cli("commit", "--store", s.root, "nope", "x")
    assert rc == 1 and err == "unionfs: commit nope: no such container or container mount point\n"
    rc, _, err = run_cli("image", "save", "--store", s.root, "base:1", "-o", tmp_path / "no/such/dir.tar")
    assert rc == 1 and "does not exist" in err
    rc, _, err = run_cli("rm", "--store", s.root, "ghost")
    assert rc == 1 and "no such container" in err


def test_diff_and_commit_of_paths_longer_than_path_max(container):
    """An upper holding a tree deeper than PATH_MAX (as a mount can make
    it): diff lists it and commit stores it, file data and xattrs included."""
    s, c = container
    comp, depth = "d" * 200, 26
    fd = os.open(c.upper, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(comp, dir_fd=fd)
        nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    out = os.open("deep", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
    os.write(out, b"deep data\n")
    os.close(out)
    os.setxattr(f"/proc/self/fd/{fd}/deep", "user.deep", b"1")
    os.symlink("deep", "link", dir_fd=fd)
    os.close(fd)
    deep = "/".join([comp] * depth)
    assert len(os.path.join(c.upper, deep)) > os.pathconf("/", "PC_PATH_MAX")

    rc, out, err = run_cli("diff", "--store", s.root, "c1")
    assert rc == 0, err
    assert f"A /{deep}/deep" in out.splitlines() and f"A /{deep}/link" in out.splitlines()
    rc, _, err = run_cli("commit", "--store", s.root, "c1", "deep:1")
    assert rc == 0, err
    members, data = layer_entries(s, "deep:1")
    by_name = {m.name: m for m in members}
    assert by_name[f"{deep}/link"].linkname == "deep"
    m = by_name[f"{deep}/deep"]
    assert m.mode & 0o777 == 0o640 and m.pax_headers.get("SCHILY.xattr.user.deep") == "1"
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile(f"{deep}/deep").read() == b"deep data\n"
