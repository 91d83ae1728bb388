"""How the store keeps layers (docs/STORE.md): each layer unpacked once plus
one compressed copy of its tar, never the uncompressed blob as well; every
blob `save` writes (and `Store.open_blob` gives, which push reads) is still
byte for byte the one loaded. No mounts: loads, saves and commits through
the CLI on tmp_path stores."""

import gzip
import hashlib
import io
import json
import os
import random
import tarfile

import pytest

from image_helpers import D, F, docker_archive, layer_tar, oci_layout, run_cli, sha
from unionfs.image.store import LAYER_META, LAYER_TAR_COPY, Store

_rng = random.Random(14)
# Text compresses, noise does not: together, a layer as a rootfs has them.
TEXT = b"".join(b"line %d of a text file such as /usr/share/doc has\n" % i for i in range(60_000))
NOISE = _rng.randbytes(200_000)
BASE = layer_tar(D("usr"), F("usr/text", TEXT), F("usr/noise", NOISE, mode=0o755))
TOP = layer_tar(D("etc"), F("etc/motd", b"hello\n"))
OTHER_TOP = layer_tar(D("etc"), F("etc/motd", b"other\n"))
LAYERS = [BASE, TOP]


def gz(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0)


def load(store, path, *extra):
    rc, _, err = run_cli("image", "load", "--store", store, "-q", path, *extra)
    assert rc == 0, err


def save(store, ref, out, fmt):
    rc, _, err = run_cli("image", "save", "--store", store, ref, "-o", out, "--format", fmt)
    assert rc == 0, err


def file_bytes(root) -> int:
    """The bytes of every regular file below `root`."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def unpacked_bytes(store) -> int:
    s = Store(store)
    return sum(file_bytes(os.path.join(s.layers_dir, name, "root")) for name in os.listdir(s.layers_dir))


def saved_layer_blobs(archive, fmt) -> list[tuple[str, bytes]]:
    """(digest named in the archive, bytes) of each layer of its one image, oldest first."""
    with tarfile.open(archive) as tf:
        def read(name):
            return tf.extractfile(name).read()
        if fmt == "docker":
            entry = json.loads(read("manifest.json"))[0]
            config = json.loads(read(entry["Config"]))
            return list(zip(config["rootfs"]["diff_ids"], map(read, entry["Layers"])))
        index = json.loads(read("index.json"))
        manifest = json.loads(read("blobs/sha256/" + index["manifests"][0]["digest"][7:]))
        return [(d["digest"], read("blobs/sha256/" + d["digest"][7:])) for d in manifest["layers"]]


def make_source(tmp_path, how, tars, tag):
    path = tmp_path / f"{how}-{tag.replace(':', '-')}"
    if how == "docker":
        docker_archive(path, tars, tags=[tag])
    else:
        oci_layout(path, tars, ref=tag, compression={"oci-gzip": "gzip", "oci-plain": "none"}[how])
    return path


def test_a_docker_archive_is_kept_unpacked_plus_a_compressed_copy(tmp_path):
    """A docker-save archive's layers are uncompressed tars: the store keeps
    them unpacked and gzip'd, not a third time as the blob."""
    store = tmp_path / "store"
    load(store, make_source(tmp_path, "docker", LAYERS, "d:1"))
    unpacked = unpacked_bytes(store)
    assert unpacked >= len(TEXT) + len(NOISE)
    assert file_bytes(store) <= 1.1 * unpacked + sum(len(gz(t)) for t in LAYERS)


@pytest.mark.parametrize("first", ["docker", "oci-gzip"])
def test_one_image_loaded_compressed_and_uncompressed_keeps_one_compressed_copy(tmp_path, first):
    """The issue's store: the same image as an OCI layout (gzip) and as a
    docker archive. The gzip blobs must stay (their digests); the tars are
    had from them, so no local copy stays either."""
    store = tmp_path / "store"
    second = "docker" if first == "oci-gzip" else "oci-gzip"
    load(store, make_source(tmp_path, first, LAYERS, "one:1"))
    load(store, make_source(tmp_path, second, LAYERS, "two:1"))
    assert file_bytes(store) <= 1.1 * unpacked_bytes(store) + sum(len(gz(t)) for t in LAYERS)
    s = Store(store)
    assert not any(os.path.exists(os.path.join(s.layers_dir, n, LAYER_TAR_COPY)) for n in os.listdir(s.layers_dir))
    for ref in ("one:1", "two:1"):
        for layer in s.resolve(ref).layers:
            with s.open_blob(layer) as f:
                assert sha(f.read()) == layer.digest


@pytest.mark.parametrize("source", ["docker", "oci-gzip", "oci-plain"])
@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_save_writes_the_blobs_that_were_loaded(tmp_path, source, fmt):
    store = tmp_path / "store"
    load(store, make_source(tmp_path, source, LAYERS, "rt:1"))
    s = Store(store)
    for layer in s.resolve("rt:1").layers:      # the contract push builds on
        with s.open_blob(layer) as f:
            assert sha(f.read()) == layer.digest
    save(store, "rt:1", tmp_path / "out.tar", fmt)
    blobs = [gz(t) for t in LAYERS] if source == "oci-gzip" and fmt == "oci" else LAYERS
    assert saved_layer_blobs(tmp_path / "out.tar", fmt) == [(sha(b), b) for b in blobs]


def test_commit_save_load_save_round_trip(tmp_path):
    """A committed layer (stored as a gzip blob) and a loaded uncompressed one
    survive save -> load -> save unchanged, with the same image ID."""
    store, other = tmp_path / "store", tmp_path / "other"
    load(store, make_source(tmp_path, "docker", LAYERS, "base:1"))
    s = Store(store)
    with s.locked():
        c = s.create_container("c1", s.resolve("base:1"))
    os.makedirs(os.path.join(c.upper, "srv"))
    with open(os.path.join(c.upper, "srv", "new"), "w") as f:
        f.write("committed\n")
    rc, _, err = run_cli("commit", "--store", store, "c1", "mine:1")
    assert rc == 0, err
    for fmt in ("docker", "oci"):
        save(store, "mine:1", tmp_path / f"first-{fmt}.tar", fmt)
        load(other, tmp_path / f"first-{fmt}.tar")
        assert Store(other).resolve("mine:1").id == s.resolve("mine:1").id
        save(other, "mine:1", tmp_path / f"again-{fmt}.tar", fmt)
        first = saved_layer_blobs(tmp_path / f"first-{fmt}.tar", fmt)
        assert saved_layer_blobs(tmp_path / f"again-{fmt}.tar", fmt) == first
        assert [d for d, b in first] == [sha(b) for d, b in first]
        assert [b for _, b in first][:2] == LAYERS      # loaded uncompressed, saved so


def make_old_layout(store):
    """Turn a store into what the code before docs/STORE.md wrote: every
    layer blob stored as received, layer.json without tar_from."""
    s = Store(store)
    for image in s.images():
        for layer in image.layers:
            meta = s.layer_meta(layer.diff_id)
            if meta.pop("tar_from", None) is None:
                continue
            with s.open_tar(layer) as f:
                tar = f.read()
            with open(s.blob_path(layer.digest), "wb") as f:
                f.write(tar)
            copy = os.path.join(s.layer_path(layer.diff_id), LAYER_TAR_COPY)
            if os.path.exists(copy):
                os.unlink(copy)
            with open(os.path.join(s.layer_path(layer.diff_id), LAYER_META), "w") as f:
                json.dump(meta, f)


def test_a_store_written_by_the_old_layout_keeps_working(tmp_path):
    store = tmp_path / "store"
    load(store, make_source(tmp_path, "docker", LAYERS, "old:1"))
    make_old_layout(store)
    s = Store(store)
    assert os.path.exists(s.blob_path(sha(BASE)))
    save(store, "old:1", tmp_path / "old.tar", "docker")
    assert saved_layer_blobs(tmp_path / "old.tar", "docker") == [(sha(t), t) for t in LAYERS]

    # New images on the old layers, then the old image removed: what the new
    # ones need stays (the uncompressed blob they name, or a gzip blob the
    # layer now reads its tar from).
    load(store, make_source(tmp_path, "docker", [BASE, OTHER_TOP], "new:1"))
    load(store, make_source(tmp_path, "oci-gzip", LAYERS, "gz:1"))
    assert s.layer_meta(sha(TOP))["tar_from"] == sha(gz(TOP))
    rc, _, err = run_cli("image", "rm", "--store", store, "old:1")
    assert rc == 0, err
    save(store, "new:1", tmp_path / "new.tar", "docker")
    assert saved_layer_blobs(tmp_path / "new.tar", "docker") == [(sha(t), t) for t in (BASE, OTHER_TOP)]
    save(store, "gz:1", tmp_path / "gz.tar", "docker")
    assert saved_layer_blobs(tmp_path / "gz.tar", "docker") == [(sha(t), t) for t in LAYERS]
    save(store, "gz:1", tmp_path / "gz-oci.tar", "oci")
    assert saved_layer_blobs(tmp_path / "gz-oci.tar", "oci") == [(sha(gz(t)), gz(t)) for t in LAYERS]


def test_a_layer_reads_its_tar_from_a_blob_still_in_use(tmp_path):
    """Two gzip blobs of one layer (compressed differently), then the image
    whose blob gave the layer's tar removed: gc keeps only the blob still in
    use, and the layer's tar comes from it."""
    store = tmp_path / "store"
    load(store, make_source(tmp_path, "oci-gzip", LAYERS, "a:1"))
    fast = [gzip.compress(t, compresslevel=1, mtime=0) for t in LAYERS]
    oci_layout(tmp_path / "fast", LAYERS, ref="b:1", blobs=fast)
    load(store, tmp_path / "fast")
    rc, _, err = run_cli("image", "rm", "--store", store, "a:1")
    assert rc == 0, err
    s = Store(store)
    assert sorted(os.listdir(s.blobs_dir)) == sorted([s.resolve("b:1").id[7:]] + [sha(b)[7:] for b in fast])
    save(store, "b:1", tmp_path / "b.tar", "docker")
    assert saved_layer_blobs(tmp_path / "b.tar", "docker") == [(sha(t), t) for t in LAYERS]
