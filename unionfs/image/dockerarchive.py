"""`docker save` archives: read (classic per-layer directories and Docker 25+
with an OCI layout inside) and write (classic, which every `docker load`
and skopeo's `docker-archive:` read).

manifest.json is a list of {"Config": path, "RepoTags": [...], "Layers": [path, ...]};
each layer file is a tar (possibly compressed) whose sha256 after
decompression is the config's rootfs.diff_ids entry.
"""

from __future__ import annotations

import io
import re
import tarfile

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.archive import Source, SourceImage, SourceLayer
from unionfs.image.progress import CountingReader

MANIFEST_FILE = "manifest.json"
# Blob paths that name their own digest: Docker 25+ (`blobs/sha256/HEX`) and
# classic configs (`HEX.json`).
_BLOB_PATH_RE = re.compile(r"^(?:\./)?blobs/sha256/([0-9a-f]{64})$")
_CLASSIC_CONFIG_RE = re.compile(r"^(?:\./)?([0-9a-f]{64})\.json$")
# Timestamps of the entries of archives we write (content is what matters).
ARCHIVE_MTIME = 0


def read_images(source: Source) -> list[SourceImage]:
    unsafe_manifest = oci.parse_json(source.read(MANIFEST_FILE, "manifest"), f"{source.label}: manifest.json")
    if not isinstance(unsafe_manifest, list) or not unsafe_manifest:
        raise UserError(f"{source.label}: manifest.json is not a non-empty list of images")
    images = []
    for i, unsafe_entry in enumerate(unsafe_manifest):
        what = f"{source.label}: manifest.json image {i}"
        if not isinstance(unsafe_entry, dict) or not isinstance(unsafe_entry.get("Config"), str) \
                or not isinstance(unsafe_entry.get("Layers"), list):
            raise UserError(f"{what}: needs \"Config\" and \"Layers\"")
        config_path = unsafe_entry["Config"]
        config_bytes = source.read(config_path, "config")
        config_digest = oci.sha256_digest(config_bytes)
        m = _BLOB_PATH_RE.match(config_path) or _CLASSIC_CONFIG_RE.match(config_path)
        if m and "sha256:" + m.group(1) != config_digest:
            raise UserError(f"{source.label}: config {config_path}: digest mismatch: "
                            f"expected {oci.short('sha256:' + m.group(1))}, got {oci.short(config_digest)}")
        config = oci.parse_json(config_bytes, f"{source.label}: config {config_path}")
        diff_ids = oci.config_diff_ids(config, f"{source.label}: config {config_path}")
        unsafe_layers = unsafe_entry["Layers"]
        if len(unsafe_layers) != len(diff_ids):
            raise UserError(f"{what}: {len(unsafe_layers)} layers but the config lists "
                            f"{len(diff_ids)} diff_ids")
        layers = []
        for unsafe_path, diff_id in zip(unsafe_layers, diff_ids):
            if not isinstance(unsafe_path, str):
                raise UserError(f"{what}: layer path {unsafe_path!r} is not a string")
            m = _BLOB_PATH_RE.match(unsafe_path)
            layers.append(SourceLayer(unsafe_path, "sha256:" + m.group(1) if m else None, None, diff_id))
        unsafe_tags = unsafe_entry.get("RepoTags") or []
        names = [t for t in unsafe_tags if isinstance(t, str) and t]
        images.append(SourceImage(config_bytes, config_digest, layers, names))
    return images


def write_archive(out, images, open_tar, progress=None):
    """Write a classic docker-archive to the binary stream `out`.

    `images` is a list of (config_bytes, [LayerInfo, ...], names);
    `open_tar(layer)` returns a readable stream of the layer's uncompressed tar.
    Layers are written uncompressed as HEX/layer.tar (HEX = diff_id), so the
    file's sha256 is its diff_id, as `docker load` expects.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        manifest = []
        written = set()
        for config_bytes, layers, names in images:
            config_name = oci.digest_hex(oci.sha256_digest(config_bytes)) + ".json"
            layer_paths = []
            for layer in layers:
                path = oci.digest_hex(layer.diff_id) + "/layer.tar"
                layer_paths.append(path)
                if path in written:
                    continue
                written.add(path)
                if progress:
                    progress.phase(f"save layer {oci.short(layer.diff_id)}", layer.tar_size)
                with open_tar(layer) as f:
                    add_file(tf, path, CountingReader(f, progress), layer.tar_size)
            if config_name not in written:
                written.add(config_name)
                add_bytes(tf, config_name, config_bytes)
            manifest.append({"Config": config_name, "RepoTags": list(names) or None,
                             "Layers": layer_paths})
        add_bytes(tf, MANIFEST_FILE, oci.canonical_json(manifest))


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes):
    add_file(tf, name, io.BytesIO(data), len(data))


def add_file(tf: tarfile.TarFile, name: str, f, size: int):
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = ARCHIVE_MTIME
    ti.type = tarfile.REGTYPE
    tf.addfile(ti, f)
