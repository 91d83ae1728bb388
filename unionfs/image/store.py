"""The local image store.

Layout (everything under one root, so renames are atomic):

    lock                      flock(2)ed by every change to the store
    tmp/                      staging for loads and commits; emptied on lock
    blobs/sha256/HEX          verified blobs, byte for byte as received: configs
                              and compressed layer blobs
    layers/HEX/root/          a layer unpacked, HEX = its diff_id; never changed
    layers/HEX/layer.json     {"diff_id", "tar_size", "tar_from"}
    layers/HEX/tar.gz         the layer's tar, gzip'd here, where no stored blob gives it
    images/HEX.json           an image (HEX = config digest = image ID): its layers
    tags.json                 {"name:tag": "sha256:..."}
    blob-sources.json         {"sha256:...": ["REGISTRY/REPO", ...]}: where a blob was
                              pulled from or pushed to (for cross-repository mounts)
    containers/NAME/          container.json, upper/, work/

A layer's tar is kept once, compressed: an uncompressed layer blob (what a
docker-save archive holds; its digest is the diff_id) is not stored as a
blob: `tar_from` names where the exact bytes come back from, a stored
compressed blob of the layer (decompressed) or `tar.gz`. So the store holds
each layer unpacked plus one compressed copy (see docs/STORE.md).

Invariants: a layer or blob exists under its final name only once complete
and verified; an image record refers only to layers and blobs that exist,
except uncompressed layer blobs, which `open_blob` rebuilds from `tar_from`;
a stored layer's `tar_from` names something that exists (a layer from a
store written before `tar_from` has none: its images' blobs are all stored
then); a load either adds all its images or leaves the store as it was
(staging in tmp/, renamed in only after every digest checked). Something left
by an interrupted rename phase is unreferenced and removed by the next `gc()`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.oci import LayerInfo
from unionfs.image.unpack import unpack_layer

ENV_STORE = "UNIONFS_STORE"
ROOT_STORE = "/var/lib/unionfs"
USER_STORE = "~/.local/share/unionfs"
LAYER_ROOT = "root"          # the unpacked tree inside layers/HEX/
LAYER_META = "layer.json"
LAYER_TAR_COPY = "tar.gz"    # layers/HEX/tar.gz, and layer.json's tar_from naming it
# Level of the local copy: its bytes never leave the store (only what it
# decompresses to does), so the fastest level (47% of a Debian rootfs tar at
# 2.5 s CPU per 200 MB, against 44% at 6 s for level 6).
TAR_COPY_LEVEL = 1
CONTAINER_META = "container.json"
# Container names, as docker allows them.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def default_store_path() -> str:
    env = os.environ.get(ENV_STORE)
    if env:
        return env
    return ROOT_STORE if os.geteuid() == 0 else os.path.expanduser(USER_STORE)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Docker Hub's registry and namespace, implied in short names (`busybox` is
# `docker.io/library/busybox`); skopeo writes the long form into archives.
DEFAULT_REGISTRY = "docker.io/"
DEFAULT_NAMESPACE = "library/"


def name_candidates(ref: str) -> list[str]:
    """The names `ref` may be stored under, most literal first: as written,
    with `:latest`, and in its long or short Docker Hub form."""
    forms = [ref]
    if ref.startswith(DEFAULT_REGISTRY):
        short = ref[len(DEFAULT_REGISTRY):]
        forms.append(short[len(DEFAULT_NAMESPACE):] if short.startswith(DEFAULT_NAMESPACE) else short)
    else:
        first = ref.split("/", 1)[0]
        if "/" not in ref:
            forms.append(DEFAULT_REGISTRY + DEFAULT_NAMESPACE + ref)
        elif "." not in first and ":" not in first and first != "localhost":
            forms.append(DEFAULT_REGISTRY + ref)
    out = []
    for form in forms:
        has_tag = ":" in form.rsplit("/", 1)[-1] or "@" in form
        for name in (form,) if has_tag else (form, form + ":latest"):
            if name not in out:
                out.append(name)
    return out


@dataclass
class Image:
    id: str                    # config digest
    layers: list[LayerInfo]    # oldest first
    names: list[str] = field(default_factory=list)


@dataclass
class Container:
    name: str
    image: str                 # image ID
    path: str
    mountpoint: str | None
    created: str
    config: dict
    image_ref: str | None = None    # the image as the user named it (`ps` shows it)

    @property
    def upper(self) -> str:
        return os.path.join(self.path, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.path, "work")


def write_atomic(path: str, data: bytes):
    """Replace `path` with `data` (temp file in the same dir, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def rmtree(path: str):
    """Remove a tree, including one whose directories' modes forbid it
    (layer trees keep the modes from the image; root is not stopped by them)."""
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0 and os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):  # top-down: fix a dir before it is listed
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    shutil.rmtree(path)


def mounted_paths() -> set[str]:
    """Mount points currently mounted (from /proc/self/mountinfo)."""
    paths = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    paths.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    except OSError:
        pass
    return paths


class _Tee:
    """Pass reads through, writing every byte to `sink` on the way."""

    def __init__(self, raw, sink):
        self._raw, self._sink = raw, sink

    def read(self, n=-1):
        data = self._raw.read(n)
        if data:
            try:
                self._sink.write(data)
            except OSError as e:     # e.g. a full disk: the store's failure, not the blob's
                raise UserError(f"store: cannot write {self._sink.name}: {e.strerror}") from None
        return data


class _BlobSink:
    """Where `import_layer` keeps a layer blob while it is verified: a
    compressed blob as received (its own bytes carry its digest), an
    uncompressed one (a tar) as a gzip copy, from which decompression gives
    back exactly the bytes that were verified. Which of the two is decided by
    the blob's first bytes; `.compression` says, once something was written."""

    def __init__(self, blob_path: str, copy_path: str):
        self._blob_path, self._copy_path = blob_path, copy_path
        self._head = b""
        self._file = self._out = None
        self.compression = None

    def _choose(self):
        self.compression = oci.sniff_compression(self._head[:4])
        if self.compression == "none":
            self._file = open(self._copy_path, "wb")
            self._out = gzip.GzipFile(filename="", fileobj=self._file, mode="wb",
                                      compresslevel=TAR_COPY_LEVEL, mtime=0)
        else:
            self._file = self._out = open(self._blob_path, "wb")

    def write(self, data: bytes):
        if self._out is None:
            self._head += data
            if len(self._head) < 4:
                return
            self._choose()
            data, self._head = self._head, b""
        self._out.write(data)

    def close(self):
        if self._out is None:
            self._choose()
            self._out.write(self._head)
        if self._out is not self._file:
            self._out.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Staging:
    """Blobs and layers of one load or commit, built in the store's tmp/
    before being renamed in by `commit()`."""

    def __init__(self, store: "Store", warn, progress=None):
        self.store = store
        self.warn = warn
        self.progress = progress
        self.dir = tempfile.mkdtemp(dir=store.tmp_dir, prefix=f"stage-{os.getpid()}-")
        self.blobs: dict[str, str] = {}     # digest -> staged file
        self.layers: dict[str, str] = {}    # diff_id -> staged layers/HEX dir
        # Layers already stored that get a better `tar_from` at commit():
        self.tar_blobs: dict[str, str] = {}     # diff_id -> a compressed blob of it
        self.tar_copies: dict[str, str] = {}    # diff_id -> staged tar.gz (layers with none)
        self._n = itertools.count(1)        # next() is atomic: layers may be imported in parallel

    def _tmp(self, prefix: str) -> str:
        return os.path.join(self.dir, f"{prefix}{next(self._n)}")

    def has_blob(self, digest: str) -> bool:
        return digest in self.blobs or self.store.has_blob(digest)

    def has_layer(self, diff_id: str) -> bool:
        return diff_id in self.layers or os.path.isdir(self.store.layer_path(diff_id))

    def put_bytes(self, data: bytes) -> str:
        digest = oci.sha256_digest(data)
        if not self.has_blob(digest):
            path = self._tmp("blob")
            with open(path, "wb") as f:
                f.write(data)
            self.blobs[digest] = path
        return digest

    def _layer_meta(self, diff_id: str) -> dict:
        layer_dir = self.layers.get(diff_id) or self.store.layer_path(diff_id)
        with open(os.path.join(layer_dir, LAYER_META), "rb") as f:
            return json.load(f)

    def layer_info(self, digest: str, diff_id: str) -> LayerInfo:
        """What we know of a blob and layer already staged or stored."""
        tar_size = self._layer_meta(diff_id)["tar_size"]
        blob = self.blobs.get(digest) or self.store.blob_path(digest)
        if digest == diff_id and not os.path.exists(blob):
            return LayerInfo(digest, tar_size, oci.LAYER_MEDIA_TYPE_FOR["none"], diff_id, tar_size)
        with open(blob, "rb") as f:
            compression = oci.sniff_compression(f.read(4))
        return LayerInfo(digest, os.path.getsize(blob), oci.LAYER_MEDIA_TYPE_FOR[compression], diff_id, tar_size)

    def has_layer_blob(self, digest: str, diff_id: str) -> bool:
        """True if the store can give blob `digest` of layer `diff_id` without
        reading it again: stored, or the layer's own tar (a layer written
        before `tar_from` existed needs its blob once more)."""
        if self.has_blob(digest):
            return self.has_layer(diff_id)
        return digest == diff_id and self.has_layer(diff_id) and bool(self._layer_meta(diff_id).get("tar_from"))

    def import_layer(self, open_blob, digest: str | None, size: int | None, diff_id: str, what: str,
                     progress=None) -> LayerInfo:
        """Verify one layer blob (its digest, if given, and its diff_id) while
        storing it and, unless that layer is already there, unpacking it.
        A compressed blob is kept as it is; of an uncompressed one (the tar)
        only a local gzip copy, and only if the layer has no way to give
        its tar yet. Layers with different digests may be imported from
        several threads; `progress` (default: the staging's) reports this
        one's bytes."""
        progress = progress or self.progress
        if digest is not None and self.has_layer_blob(digest, diff_id):
            return self.layer_info(digest, diff_id)
        blob_tmp, copy_tmp = self._tmp("blob"), self._tmp("tar-copy")
        layer_tmp = None if self.has_layer(diff_id) else self._tmp("layer")
        with _BlobSink(blob_tmp, copy_tmp) as sink, open_blob() as raw:
            stream = oci.LayerStream(_Tee(raw, sink), digest, diff_id, what, size, progress)
            if layer_tmp is not None:
                os.mkdir(layer_tmp)
                os.mkdir(os.path.join(layer_tmp, LAYER_ROOT))
                unpack_layer(stream.tar, os.path.join(layer_tmp, LAYER_ROOT), what, self.warn, progress)
            stream.finish()
        digest = stream.digest
        if sink.compression == "none":
            tar_from = LAYER_TAR_COPY
        else:
            tar_from = digest
            if self.has_blob(digest):
                os.unlink(blob_tmp)
            else:
                self.blobs[digest] = blob_tmp
        if layer_tmp is not None:
            if tar_from == LAYER_TAR_COPY:
                os.rename(copy_tmp, os.path.join(layer_tmp, LAYER_TAR_COPY))
            with open(os.path.join(layer_tmp, LAYER_META), "w") as f:
                json.dump({"diff_id": diff_id, "tar_size": stream.tar_size, "tar_from": tar_from}, f)
            self.layers[diff_id] = layer_tmp
        elif tar_from != LAYER_TAR_COPY:
            self.tar_blobs[diff_id] = tar_from
        elif not self._layer_meta(diff_id).get("tar_from"):
            self.tar_copies[diff_id] = copy_tmp
        return self.layer_info(digest, diff_id)

    def commit(self):
        """Rename everything staged into the store (caller holds the lock)."""
        for digest, path in self.blobs.items():
            final = self.store.blob_path(digest)
            if not os.path.exists(final):
                os.chmod(path, 0o444)
                os.rename(path, final)
        for diff_id, path in self.layers.items():
            final = self.store.layer_path(diff_id)
            if not os.path.exists(final):
                os.rename(path, final)
        for diff_id, digest in self.tar_blobs.items():
            self.store.set_tar_from(diff_id, digest)
        for diff_id, copy in self.tar_copies.items():
            self.store.set_tar_from(diff_id, LAYER_TAR_COPY, copy)
        self.blobs.clear()
        self.layers.clear()
        self.tar_blobs.clear()
        self.tar_copies.clear()

    def cleanup(self):
        rmtree(self.dir)


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.blobs_dir = os.path.join(self.root, "blobs", "sha256")
        self.layers_dir = os.path.join(self.root, "layers")
        self.images_dir = os.path.join(self.root, "images")
        self.containers_dir = os.path.join(self.root, "containers")
        self.tags_file = os.path.join(self.root, "tags.json")
        self.blob_sources_file = os.path.join(self.root, "blob-sources.json")

    # -- paths -----------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs_dir, oci.digest_hex(digest))

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, oci.digest_hex(diff_id))

    def layer_root(self, diff_id: str) -> str:
        return os.path.join(self.layer_path(diff_id), LAYER_ROOT)

    def _image_file(self, image_id: str) -> str:
        return os.path.join(self.images_dir, oci.digest_hex(image_id) + ".json")

    # -- locking ---------------------------------------------------------------

    def _ensure(self):
        try:
            for d in (self.tmp_dir, self.blobs_dir, self.layers_dir, self.images_dir, self.containers_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UserError(f"store {self.root}: cannot create it: {e.strerror}") from None

    @contextlib.contextmanager
    def locked(self):
        """Hold the store's lock; whatever is left in tmp/ then is stale."""
        self._ensure()
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for entry in os.listdir(self.tmp_dir):
                rmtree(os.path.join(self.tmp_dir, entry))
            yield
        finally:
            os.close(fd)

    # -- images ----------------------------------------------------------------

    def tags(self) -> dict[str, str]:
        try:
            with open(self.tags_file, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _write_tags(self, tags: dict[str, str]):
        write_atomic(self.tags_file, json.dumps(dict(sorted(tags.items())), indent=1).encode())

    def images(self) -> list[Image]:
        tags = self.tags()
        images = []
        try:
            files = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        for fname in files:
            if fname.endswith(".json") and not fname.startswith("."):
                with open(os.path.join(self.images_dir, fname), "rb") as f:
                    rec = json.load(f)
                names = sorted(n for n, i in tags.items() if i == rec["id"])
                images.append(Image(rec["id"], [LayerInfo.from_json(x) for x in rec["layers"]], names))
        return images

    def image(self, image_id: str) -> Image:
        for image in self.images():
            if image.id == image_id:
                return image
        raise UserError(f"image {oci.short(image_id)}: no such image in the store")

    def resolve(self, ref: str) -> Image:
        """An image by name (as loaded or tagged, see `name_candidates`), or
        by a unique prefix of its ID."""
        tags = self.tags()
        for name in name_candidates(ref):
            if name in tags:
                return self.image(tags[name])
        prefix = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if re.fullmatch(r"[0-9a-f]{1,64}", prefix):
            matches = [i for i in self.images() if oci.digest_hex(i.id).startswith(prefix)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UserError(f"image {ref}: ambiguous ID prefix ({len(matches)} images match)")
        raise UserError(f"image {ref}: no such image")

    def config_bytes(self, image: Image) -> bytes:
        with open(self.blob_path(image.id), "rb") as f:
            return f.read()

    def config(self, image: Image) -> dict:
        return json.loads(self.config_bytes(image))

    def has_blob(self, digest: str) -> bool:
        """True if blob `digest` is stored as it is (uncompressed layer
        blobs are not: `open_blob` rebuilds them)."""
        return os.path.exists(self.blob_path(digest))

    def layer_meta(self, diff_id: str) -> dict:
        with open(os.path.join(self.layer_path(diff_id), LAYER_META), "rb") as f:
            return json.load(f)

    def open_blob(self, layer: LayerInfo):
        """A readable stream of exactly the bytes whose sha256 is `layer.digest`."""
        try:
            return open(self.blob_path(layer.digest), "rb")
        except FileNotFoundError:
            if layer.digest != layer.diff_id:
                raise UserError(f"layer blob {oci.short(layer.digest)} is missing from the store") from None
        return self._open_layer_tar(layer.diff_id)

    def open_tar(self, layer: LayerInfo):
        """The layer's uncompressed tar, as a readable stream (closing it
        closes the blob)."""
        try:
            f = open(self.blob_path(layer.digest), "rb")
        except FileNotFoundError:
            return self._open_layer_tar(layer.diff_id)
        return _decompressed(f, f"layer {oci.short(layer.digest)}")

    def _open_layer_tar(self, diff_id: str):
        """Layer `diff_id`'s tar, from where its layer.json says."""
        for _ in range(2):      # once more if set_tar_from() moved it meanwhile
            tar_from = self.layer_meta(diff_id).get("tar_from")
            try:
                if tar_from == LAYER_TAR_COPY:
                    return gzip.open(os.path.join(self.layer_path(diff_id), LAYER_TAR_COPY), "rb")
                if tar_from:
                    return _decompressed(open(self.blob_path(tar_from), "rb"), f"layer {oci.short(diff_id)}")
            except FileNotFoundError:
                continue
            break
        raise UserError(f"layer {oci.short(diff_id)}: its tar is missing from the store")

    def set_tar_from(self, diff_id: str, tar_from: str, copy: str | None = None):
        """Give stored layer `diff_id` a (better) source of its tar (lock
        held): a compressed blob now stored replaces a local copy, which is
        then removed; a layer from before `tar_from` gets `copy` as its
        tar.gz. layer.json is replaced atomically; a crash leaves at most an
        unused tar.gz, which `gc()` removes."""
        meta = self.layer_meta(diff_id)
        if meta.get("tar_from") not in (None, LAYER_TAR_COPY):
            return                  # a stored blob already gives it
        if tar_from == LAYER_TAR_COPY:
            if meta.get("tar_from") is not None:
                return
            os.rename(copy, os.path.join(self.layer_path(diff_id), LAYER_TAR_COPY))
        meta["tar_from"] = tar_from
        write_atomic(os.path.join(self.layer_path(diff_id), LAYER_META), json.dumps(meta).encode())
        if tar_from != LAYER_TAR_COPY:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.layer_path(diff_id), LAYER_TAR_COPY))

    def lowerdirs(self, image: Image) -> list[str]:
        """Layer trees for a mount, top (newest) first; a layer that appears
        twice is kept only at its top-most place (the lower copy can show
        nothing the upper copy does not)."""
        dirs = []
        for layer in reversed(image.layers):
            d = self.layer_root(layer.diff_id)
            if d not in dirs:
                dirs.append(d)
        return dirs

    def add_image(self, staging: Staging, config_bytes: bytes, layers: list[LayerInfo],
                  names: list[str]) -> Image:
        """Store an image whose blobs and layers are staged or stored (lock held)."""
        image_id = staging.put_bytes(config_bytes)
        staging.commit()
        for layer in layers:
            if not os.path.isdir(self.layer_path(layer.diff_id)):
                raise UserError(f"layer {oci.short(layer.diff_id)} vanished from the store")
        write_atomic(self._image_file(image_id), json.dumps(
            {"id": image_id, "layers": [x.to_json() for x in layers], "added": now_rfc3339()},
            indent=1).encode())
        if names:
            tags = self.tags()
            for name in names:
                tags[name] = image_id
            self._write_tags(tags)
        return self.image(image_id)

    def tag(self, image: Image, name: str):
        """Give `image` the name `name` (lock held); the name leaves any other image."""
        tags = self.tags()
        tags[name] = image.id
        self._write_tags(tags)

    def untag(self, name: str):
        tags = self.tags()
        tags.pop(name, None)
        self._write_tags(tags)

    # Remember at most this many repositories per blob.
    MAX_BLOB_SOURCES = 8

    def blob_sources(self, digest: str) -> list[str]:
        """Repositories (REGISTRY/REPO) known to hold blob `digest`, newest first."""
        try:
            with open(self.blob_sources_file, "rb") as f:
                sources = json.load(f).get(digest, [])
        except (FileNotFoundError, ValueError):
            return []
        return [s for s in sources if isinstance(s, str)]

    def note_blob_sources(self, digests, repository: str):
        """Record that `repository` holds these blobs (lock held)."""
        try:
            with open(self.blob_sources_file, "rb") as f:
                sources = json.load(f)
        except (FileNotFoundError, ValueError):
            sources = {}
        for digest in digests:
            known = [s for s in sources.get(digest, []) if s != repository]
            sources[digest] = [repository, *known][:self.MAX_BLOB_SOURCES]
        write_atomic(self.blob_sources_file, json.dumps(sources, indent=1, sort_keys=True).encode())

    def remove_image(self, image: Image):
        """Forget an image and its names (lock held); `gc()` frees its layers."""
        users = [c.name for c in self.containers() if c.image == image.id]
        if users:
            raise UserError(f"image {oci.short(image.id)} is used by container {users[0]} "
                            f"(remove it first with: unionfs rm {users[0]})")
        tags = {n: i for n, i in self.tags().items() if i != image.id}
        self._write_tags(tags)
        os.unlink(self._image_file(image.id))

    def gc(self) -> tuple[int, int]:
        """Remove layers and blobs no image refers to (lock held); returns
        (layers, blobs) removed."""
        used_layers, used_blobs = set(), set()
        compressed: dict[str, list[str]] = {}   # layer HEX -> digests of its compressed blobs in use
        for image in self.images():
            used_blobs.add(oci.digest_hex(image.id))
            for layer in image.layers:
                used_layers.add(oci.digest_hex(layer.diff_id))
                used_blobs.add(oci.digest_hex(layer.digest))
                if layer.digest != layer.diff_id:
                    compressed.setdefault(oci.digest_hex(layer.diff_id), []).append(layer.digest)
        n_layers = n_blobs = 0
        for name in os.listdir(self.layers_dir):
            if name not in used_layers:
                # Rename first, so no half-removed layer is ever visible.
                doomed = tempfile.mkdtemp(dir=self.tmp_dir, prefix="gc-")
                os.rename(os.path.join(self.layers_dir, name), os.path.join(doomed, name))
                rmtree(doomed)
                n_layers += 1
                continue
            meta = self.layer_meta("sha256:" + name)
            tar_from = meta.get("tar_from")
            if not tar_from or tar_from == LAYER_TAR_COPY:
                continue
            if oci.digest_hex(tar_from) not in used_blobs:
                # Its image is gone: read the tar from a blob an image still
                # uses, if there is one, rather than keep this one for it.
                others = [d for d in compressed.get(name, ()) if self.has_blob(d)]
                if others:
                    meta["tar_from"] = tar_from = others[0]
                    write_atomic(os.path.join(self.layers_dir, name, LAYER_META), json.dumps(meta).encode())
            used_blobs.add(oci.digest_hex(tar_from))
            with contextlib.suppress(FileNotFoundError):   # left by a crash in set_tar_from
                os.unlink(os.path.join(self.layers_dir, name, LAYER_TAR_COPY))
        for name in os.listdir(self.blobs_dir):
            if name not in used_blobs:
                os.unlink(os.path.join(self.blobs_dir, name))
                n_blobs += 1
        return n_layers, n_blobs

    # -- containers ------------------------------------------------------------

    def containers(self) -> list[Container]:
        try:
            names = sorted(os.listdir(self.containers_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            c = self._read_container(name)
            if c is not None:
                out.append(c)
        return out

    def _read_container(self, name: str) -> Container | None:
        path = os.path.join(self.containers_dir, name)
        try:
            with open(os.path.join(path, CONTAINER_META), "rb") as f:
                rec = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Container(rec["name"], rec["image"], path, rec.get("mountpoint"), rec["created"],
                         rec.get("config") or {}, rec.get("image_ref"))

    def container(self, name: str) -> Container | None:
        if not _NAME_RE.match(name):
            return None
        return self._read_container(name)

    def write_container(self, c: Container):
        write_atomic(os.path.join(c.path, CONTAINER_META), json.dumps(
            {"name": c.name, "image": c.image, "mountpoint": c.mountpoint, "created": c.created,
             "config": c.config, "image_ref": c.image_ref}, indent=1).encode())

    def create_container(self, name: str, image: Image, ref: str | None = None) -> Container:
        """A new container (lock held): built in tmp/, renamed into place;
        `ref` is the image's name as the user gave it."""
        if not _NAME_RE.match(name):
            raise UserError(f"container name {name!r} is invalid (letters, digits, _ . -)")
        staging = tempfile.mkdtemp(dir=self.tmp_dir, prefix="ctr-")
        os.mkdir(os.path.join(staging, "upper"), 0o755)
        os.mkdir(os.path.join(staging, "work"), 0o700)
        config = self.config(image).get("config") or {}
        c = Container(name, image.id, staging, None, now_rfc3339(), config)
        c.image_ref = ref
        self.write_container(c)
        final = os.path.join(self.containers_dir, name)
        try:
            os.rename(staging, final)
        except OSError as e:
            rmtree(staging)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UserError(f"container {name} already exists") from None
            raise
        c.path = final
        return c

    def remove_container(self, c: Container):
        doomed = tempfile.mkdtemp(dir=self.tmp_dir, prefix="rm-")
        os.rename(c.path, os.path.join(doomed, c.name))
        rmtree(doomed)

    def container_by_mountpoint(self, path: str) -> Container | None:
        real = os.path.realpath(path)
        for c in self.containers():
            if c.mountpoint and os.path.realpath(c.mountpoint) == real:
                return c
        return None

    def container_by_upper(self, path: str) -> Container | None:
        real = os.path.realpath(path)
        for c in self.containers():
            if os.path.realpath(c.upper) == real:
                return c
        return None


def _decompressed(f, what: str):
    """Blob file `f` (opened "rb") as its uncompressed content (closing it closes `f`)."""
    compression = oci.sniff_compression(f.peek(4)[:4])
    if compression == "none":
        return f
    return _Closing(oci.decompressor(f, compression, what), f)


class _Closing:
    """A stream that also closes `inner` when closed (decompressor + file)."""

    def __init__(self, stream, inner):
        self._stream, self._inner = stream, inner

    def read(self, n=-1):
        return self._stream.read(n)

    def close(self):
        self._stream.close()
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
