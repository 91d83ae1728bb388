"""Loading images into the store: every input format, digest verification,
atomicity, names, removal and garbage collection (no FUSE needed)."""

import gzip
import json
import os

import pytest

from image_helpers import (D, F, H, L, config_for, docker_archive, layer_tar, oci_layout, replace_member,
                           run_cli, sha)
from unionfs.image import oci
from unionfs.image.store import Store

BASE = layer_tar(D("etc"), F("etc/motd", b"hello\n"), F("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
                 D("app"), F("app/a", b"a"), H("app/a2", "app/a"), L("bin", "usr/bin"))
TOP = layer_tar(D("etc"), F("etc/motd", b"changed\n"), F("etc/.wh.passwd"), D("app"),
                F("app/.wh..wh..opq"), F("app/new", b"new"))


def snapshot(root) -> list:
    """Everything in a store, for checking that a failed load changed nothing."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel == "lock":
                continue
            data = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            out.append((rel, data))
    return sorted(out, key=lambda x: x[0])


def load(store, path, *extra):
    return run_cli("image", "load", "--store", store, "-q", path, *extra)


def layer_files(store, image_ref):
    s = Store(store)
    image = s.resolve(image_ref)
    return [sorted(os.listdir(s.layer_root(l.diff_id))) for l in image.layers]


@pytest.mark.parametrize("fmt", ["docker-classic", "docker-25", "oci-dir", "oci-tar", "oci-zstd", "oci-plain"])
def test_every_input_format_loads_the_same_image(tmp_path, fmt):
    src = tmp_path / "src"
    if fmt == "docker-classic":
        docker_archive(src, [BASE, TOP], tags=["demo:1"])
    elif fmt == "docker-25":
        docker_archive(src, [BASE, TOP], tags=["demo:1"], style="oci")
    elif fmt == "oci-dir":
        oci_layout(src, [BASE, TOP], ref="demo:1")
    elif fmt == "oci-tar":
        oci_layout(src, [BASE, TOP], ref="demo:1", as_tar=True)
    elif fmt == "oci-zstd":
        pytest.importorskip("zstandard")
        oci_layout(src, [BASE, TOP], ref="demo:1", compression="zstd")
    else:
        oci_layout(src, [BASE, TOP], ref="demo:1", compression="none")
    store = tmp_path / "store"
    rc, out, err = load(store, src)
    assert (rc, err) == (0, "")
    s = Store(store)
    image = s.resolve("demo:1")
    assert image.id == sha(config_for([BASE, TOP]))
    assert [l.diff_id for l in image.layers] == [sha(BASE), sha(TOP)]
    base, top = (s.layer_root(l.diff_id) for l in image.layers)
    assert open(os.path.join(base, "etc/motd"), "rb").read() == b"hello\n"
    assert os.path.exists(os.path.join(top, "etc/.wh.passwd"))
    assert os.path.exists(os.path.join(top, "app/.wh..wh..opq"))
    assert os.lstat(os.path.join(base, "app/a2")).st_ino == os.lstat(os.path.join(base, "app/a")).st_ino
    assert os.listdir(s.tmp_dir) == []


def test_layers_are_shared_between_images(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE], tags=["a:1"])
    docker_archive(tmp_path / "b.tar", [BASE, TOP], tags=["b:1"])
    assert load(store, tmp_path / "a.tar")[0] == 0
    assert load(store, tmp_path / "b.tar")[0] == 0
    assert sorted(os.listdir(Store(store).layers_dir)) == sorted([sha(BASE)[7:], sha(TOP)[7:]])


def test_names_tag_option_and_id_prefix(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE], tags=["repo/name:1.0", "other"])
    assert load(store, tmp_path / "a.tar")[0] == 0
    image_id = sha(config_for([BASE]))
    s = Store(store)
    assert s.resolve("repo/name:1.0").id == image_id
    assert s.resolve("other").id == image_id           # as written in RepoTags
    assert s.resolve(image_id[7:15]).id == image_id     # unique ID prefix
    assert s.resolve(image_id).id == image_id
    oci_layout(tmp_path / "o", [TOP], ref="v2")
    rc, _, err = load(store, tmp_path / "o", "--tag", "mine")
    assert rc == 0, err
    assert s.resolve("mine").id == s.resolve("mine:latest").id == sha(config_for([TOP]))
    rc, _, err = run_cli("image", "inspect", "--store", store, "nope")
    assert rc == 1 and err == "unionfs: image nope: no such image\n"


@pytest.mark.parametrize("as_tar", [False, True])
def test_an_oci_ref_name_is_an_image_name_as_podman_load_reads_it(tmp_path, as_tar):
    """podman 4.3 loads an OCI archive whose ref.name is `base` as the image
    `localhost/base:latest` (and `debian:base` as `localhost/debian:base`):
    the annotation names the image, with `:latest` when it has no tag."""
    store = tmp_path / "store"
    oci_layout(tmp_path / "base.oci", [BASE], ref="base", as_tar=as_tar)
    oci_layout(tmp_path / "top.oci", [TOP], ref="debian:base", as_tar=as_tar)
    for layout in ("base.oci", "top.oci"):
        assert load(store, tmp_path / layout)[0] == 0
    rc, out, _ = run_cli("image", "ls", "--store", store)
    rows = sorted(line.split()[:2] for line in out.splitlines()[1:])
    assert rows == [["base", "latest"], ["debian", "base"]]
    s = Store(store)
    assert s.resolve("base").id == s.resolve("base:latest").id == sha(config_for([BASE]))
    assert s.resolve("debian:base").id == sha(config_for([TOP]))


def test_containerd_name_annotation_names_the_image(tmp_path):
    """Docker 25+ and containerd write the tag alone in ref.name and the full
    name beside it; the full name is the image's name."""
    src = tmp_path / "o"
    oci_layout(src, [BASE], ref="1.0")
    index = json.loads((src / "index.json").read_text())
    index["manifests"][0]["annotations"][oci.ANNOTATION_CONTAINERD_NAME] = "docker.io/library/demo:1.0"
    (src / "index.json").write_text(json.dumps(index))
    assert load(tmp_path / "store", src)[0] == 0
    assert Store(tmp_path / "store").tags() == {"docker.io/library/demo:1.0": sha(config_for([BASE]))}


def test_inspect_and_history(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE, TOP], tags=["x:1"])
    load(store, tmp_path / "a.tar")
    rc, out, _ = run_cli("image", "inspect", "--store", store, "x:1")
    info = json.loads(out)[0]
    assert info["Config"]["Env"] == ["PATH=/bin"] and info["Config"]["Cmd"] == ["/bin/sh"]
    assert {"Entrypoint", "WorkingDir", "User"} <= set(info["Config"])
    assert info["RootFS"]["Layers"] == [sha(BASE), sha(TOP)]
    rc, out, _ = run_cli("image", "history", "--store", store, "x:1")
    lines = out.splitlines()
    assert "CREATED BY" in lines[0]
    assert "layer 1" in lines[1] and "layer 0" in lines[2]   # newest first


def _assert_refused(tmp_path, src, message):
    store = tmp_path / "store"
    docker_archive(tmp_path / "good.tar", [BASE], tags=["good:1"])
    assert load(store, tmp_path / "good.tar")[0] == 0
    before = snapshot(store)
    rc, out, err = load(store, src)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("unionfs: load ") and message in err, err
    assert "Traceback" not in err
    assert snapshot(store) == before


def test_diff_id_mismatch_leaves_store_unchanged(tmp_path):
    tampered = layer_tar(D("etc"), F("etc/motd", b"evil!\n"))
    docker_archive(tmp_path / "bad.tar", [BASE, TOP], blobs=[BASE, tampered])
    _assert_refused(tmp_path, tmp_path / "bad.tar", "diff_id: digest mismatch")


def test_oci_blob_digest_mismatch_leaves_store_unchanged(tmp_path):
    src = tmp_path / "bad"
    oci_layout(src, [BASE, TOP])
    # Replace the top layer's blob content, keeping its name.
    top_blob = src / "blobs/sha256" / sha(gzip.compress(TOP, mtime=0))[7:]
    top_blob.write_bytes(gzip.compress(TOP + b"\0" * 512, mtime=0))
    _assert_refused(tmp_path, src, "digest mismatch")


def _recompressed(tar: bytes) -> tuple[bytes, bytes]:
    """Two gzip blobs of the same tar, of the same size, differing only in
    the header's mtime: one diff_id, two blob digests."""
    named, served = gzip.compress(tar, mtime=0), gzip.compress(tar, mtime=1)
    assert len(named) == len(served) and named != served
    return named, served


def _assert_blob_refused(tmp_path, src, named):
    """Refused for the blob's own digest (not the diff_id, not the size)."""
    _assert_refused(tmp_path, src, f"layer {oci.short(sha(named))}: digest mismatch: "
                                   f"expected {oci.short(sha(named))}")


def test_oci_blob_recompressed_is_refused_by_the_blob_digest(tmp_path):
    src = tmp_path / "bad"
    named, served = _recompressed(TOP)
    oci_layout(src, [BASE, TOP], blobs=[gzip.compress(BASE, mtime=0), named])
    (src / "blobs/sha256" / sha(named)[7:]).write_bytes(served)
    _assert_blob_refused(tmp_path, src, named)


def test_docker_25_blob_recompressed_is_refused_by_the_blob_digest(tmp_path):
    src = tmp_path / "bad.tar"
    named, served = _recompressed(TOP)
    docker_archive(src, [BASE, TOP], style="oci", blobs=[BASE, named])
    replace_member(src, "blobs/sha256/" + sha(named)[7:], served)
    _assert_blob_refused(tmp_path, src, named)


@pytest.mark.parametrize("style,config_name", [
    ("oci", "blobs/sha256/{hex}"), ("classic", "{hex}.json")])
def test_docker_archive_config_digest_mismatch(tmp_path, style, config_name):
    """The config's file name claims its digest: a config edited in place is
    refused (Docker 25+ blobs/sha256/HEX and classic HEX.json alike)."""
    src = tmp_path / "bad.tar"
    config = config_for([BASE])
    docker_archive(src, [BASE], style=style, config=config)
    name = config_name.format(hex=sha(config)[7:])
    replace_member(src, name, config.replace(b"/bin/sh", b"/bin/xx"))
    _assert_refused(tmp_path, src, f"config {name}: digest mismatch")


def test_config_digest_mismatch(tmp_path):
    src = tmp_path / "bad"
    oci_layout(src, [BASE])
    cfg = src / "blobs/sha256" / sha(config_for([BASE]))[7:]
    cfg.write_bytes(cfg.read_bytes().replace(b"/bin/sh", b"/bin/xx"))
    _assert_refused(tmp_path, src, "config")


def test_corrupt_gzip(tmp_path):
    blob = bytearray(gzip.compress(TOP, mtime=0))
    blob[len(blob) // 2] ^= 0xFF
    src = tmp_path / "bad"
    oci_layout(src, [BASE, TOP], blobs=[gzip.compress(BASE, mtime=0), bytes(blob)])
    _assert_refused(tmp_path, src, "layer")


def test_hostile_layer_message_names_archive_layer_and_entry(tmp_path):
    evil = layer_tar(F("../etc/passwd", b"x"))
    docker_archive(tmp_path / "x.tar", [evil])
    _assert_refused(tmp_path, tmp_path / "x.tar",
                    f'x.tar: layer {oci.short(sha(evil))}: entry "../etc/passwd" escapes the layer')


def test_layer_count_mismatch(tmp_path):
    docker_archive(tmp_path / "bad.tar", [BASE, TOP], config=config_for([BASE]))
    _assert_refused(tmp_path, tmp_path / "bad.tar", "2 layers but the config lists 1 diff_ids")


def test_not_an_archive(tmp_path):
    (tmp_path / "junk").write_bytes(b"junk" * 1000)
    _assert_refused(tmp_path, tmp_path / "junk", "not a readable tar archive")
    (tmp_path / "empty").mkdir()
    _assert_refused(tmp_path, tmp_path / "empty", "neither a docker-archive")


def test_interrupted_load_leaves_store_unchanged(tmp_path, monkeypatch):
    store = tmp_path / "store"
    docker_archive(tmp_path / "good.tar", [BASE], tags=["good:1"])
    load(store, tmp_path / "good.tar")
    before = snapshot(store)
    docker_archive(tmp_path / "new.tar", [TOP, layer_tar(F("z", b"z"))])
    import unionfs.image.store as store_mod
    real = store_mod.unpack_layer
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(store_mod, "unpack_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        from unionfs.image.commands import cmd_load
        import argparse
        cmd_load(argparse.Namespace(store=str(store), quiet=True, path=str(tmp_path / "new.tar"), tag=None))
    assert snapshot(store) == before


def test_zstd_without_the_module(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_zstd(name, *a, **kw):
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *a, **kw)
    pytest.importorskip("zstandard")
    src = tmp_path / "z"
    oci_layout(src, [BASE], compression="zstd")
    monkeypatch.setattr(builtins, "__import__", no_zstd)
    _assert_refused(tmp_path, src, "install the 'zstandard' package")


def test_rm_untags_then_removes_and_collects_layers(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE], tags=["a:1", "a:2"])
    docker_archive(tmp_path / "b.tar", [BASE, TOP], tags=["b:1"])
    load(store, tmp_path / "a.tar")
    load(store, tmp_path / "b.tar")
    s = Store(store)
    rc, out, _ = run_cli("image", "rm", "--store", store, "a:1")
    assert rc == 0 and out == "Untagged: a:1\n"
    assert s.resolve("a:2")
    rc, out, _ = run_cli("image", "rm", "--store", store, "b:1")
    assert rc == 0 and "Deleted: " + sha(config_for([BASE, TOP])) in out
    assert os.listdir(s.layers_dir) == [sha(BASE)[7:]]          # still used by a:2
    # An uncompressed layer blob is kept as the layer's tar.gz, not as a blob.
    assert os.listdir(s.blobs_dir) == [sha(config_for([BASE]))[7:]]
    run_cli("image", "rm", "--store", store, "a:2")
    assert os.listdir(s.layers_dir) == [] and os.listdir(s.blobs_dir) == []
    assert s.images() == []


def test_rm_refuses_an_image_a_container_uses(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE], tags=["a:1"])
    load(store, tmp_path / "a.tar")
    s = Store(store)
    with s.locked():
        s.create_container("c1", s.resolve("a:1"))
    rc, _, err = run_cli("image", "rm", "--store", store, "a:1")
    assert rc == 1 and "used by container c1" in err
    rc, out, _ = run_cli("ps", "-a", "--store", store)
    assert "c1" in out and "a:1" in out and "Unmounted" in out
    assert run_cli("rm", "--store", store, "c1")[0] == 0
    assert run_cli("image", "rm", "--store", store, "a:1")[0] == 0


def test_ls(tmp_path):
    store = tmp_path / "store"
    docker_archive(tmp_path / "a.tar", [BASE], tags=["repo/a:1"])
    load(store, tmp_path / "a.tar")
    rc, out, _ = run_cli("image", "ls", "--store", store)
    header, row = out.splitlines()
    assert header.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert row.split()[:3] == ["repo/a", "1", sha(config_for([BASE]))[7:19]]
    rc, out, _ = run_cli("image", "ls", "--store", store, "-q")
    assert out == sha(config_for([BASE]))[7:19] + "\n"


def test_default_store_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIONFS_STORE", str(tmp_path / "env-store"))
    docker_archive(tmp_path / "a.tar", [BASE], tags=["a:1"])
    assert run_cli("image", "load", "-q", tmp_path / "a.tar")[0] == 0
    assert os.path.isdir(tmp_path / "env-store" / "layers" / sha(BASE)[7:])
