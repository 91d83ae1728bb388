"""OCI image layouts (oci-layout, index.json, blobs/sha256/HEX): read from a
directory or tar, write as a tar (what skopeo's `oci-archive:` reads, and what
umoci reads once extracted)."""

from __future__ import annotations

import platform
import tarfile

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.archive import Source, SourceImage, SourceLayer
from unionfs.image.dockerarchive import add_bytes, add_file
from unionfs.image.progress import CountingReader

OCI_LAYOUT_FILE = oci.OCI_LAYOUT_FILE
# Index nesting deeper than this is refused (a loop, or hostile input).
MAX_INDEX_DEPTH = 4
# Our machine's architecture, in OCI platform terms.
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(platform.machine(), platform.machine())


def blob_path(digest: str) -> str:
    return f"{oci.OCI_BLOBS_DIR}/sha256/{oci.digest_hex(digest)}"


def _read_blob(source: Source, desc: oci.Descriptor, what: str) -> bytes:
    data = source.read(blob_path(desc.digest), what)
    actual = oci.sha256_digest(data)
    if actual != desc.digest:
        raise UserError(f"{source.label}: {what} {oci.short(desc.digest)}: digest mismatch: "
                        f"got {oci.short(actual)}")
    if len(data) != desc.size:
        raise UserError(f"{source.label}: {what} {oci.short(desc.digest)}: {len(data)} bytes, "
                        f"descriptor says {desc.size}")
    return data


def _platform_ok(desc_json: dict) -> bool:
    p = desc_json.get("platform")
    if not isinstance(p, dict):
        return True
    return p.get("os", "linux") == "linux" and p.get("architecture", _ARCH) == _ARCH


def _resolve_manifest(source: Source, desc: oci.Descriptor, depth: int) -> tuple[oci.Descriptor, dict]:
    """Follow image indexes down to one image manifest (for our platform)."""
    if depth > MAX_INDEX_DEPTH:
        raise UserError(f"{source.label}: image indexes nested too deeply")
    data = _read_blob(source, desc, "manifest")
    unsafe = oci.parse_json(data, f"{source.label}: manifest {oci.short(desc.digest)}")
    if not isinstance(unsafe, dict):
        raise UserError(f"{source.label}: manifest {oci.short(desc.digest)} is not an object")
    media_type = unsafe.get("mediaType") or desc.media_type
    if media_type in oci.INDEX_MEDIA_TYPES or ("manifests" in unsafe and "layers" not in unsafe):
        candidates = [m for m in unsafe.get("manifests") or [] if isinstance(m, dict) and _platform_ok(m)]
        if not candidates:
            raise UserError(f"{source.label}: index {oci.short(desc.digest)} has no image for linux/{_ARCH}")
        return _resolve_manifest(source, oci.parse_descriptor(candidates[0], source.label), depth + 1)
    if media_type and media_type not in oci.MANIFEST_MEDIA_TYPES:
        raise UserError(f"{source.label}: {oci.short(desc.digest)} has unsupported media type {media_type!r}")
    return desc, unsafe


def read_images(source: Source) -> list[SourceImage]:
    layout = oci.parse_json(source.read(OCI_LAYOUT_FILE, "oci-layout"), f"{source.label}: oci-layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise UserError(f"{source.label}: oci-layout has no imageLayoutVersion")
    index = oci.parse_json(source.read(oci.OCI_INDEX_FILE, "index"), f"{source.label}: index.json")
    unsafe_manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(unsafe_manifests, list) or not unsafe_manifests:
        raise UserError(f"{source.label}: index.json lists no manifests")
    by_config: dict[str, SourceImage] = {}
    for unsafe_desc in unsafe_manifests:
        desc = oci.parse_descriptor(unsafe_desc, f"{source.label}: index.json")
        _, manifest = _resolve_manifest(source, desc, 0)
        image = _image_from_manifest(source, manifest, desc.digest)
        image = by_config.setdefault(image.config_digest, image)
        name = _image_name(desc.annotations)
        if name and name not in image.names:
            image.names.append(name)
    return list(by_config.values())


def _image_name(annotations: dict) -> str | None:
    """The image name an index entry gives, read as `podman load` reads an
    OCI archive: ref.name is an image name, `base` meaning `base:latest`
    (podman adds its `localhost/` too; we keep short names as they are, as
    for every other source). containerd's full-name annotation wins where
    present: Docker 25+ puts only the tag in ref.name."""
    for key in (oci.ANNOTATION_CONTAINERD_NAME, oci.ANNOTATION_REF_NAME):
        unsafe_name = annotations.get(key)
        if isinstance(unsafe_name, str) and unsafe_name:
            return oci.with_default_tag(unsafe_name)
    return None


def _image_from_manifest(source: Source, unsafe: dict, digest: str) -> SourceImage:
    what = f"{source.label}: manifest {oci.short(digest)}"
    config_desc = oci.parse_descriptor(unsafe.get("config"), what)
    config_bytes = _read_blob(source, config_desc, "config")
    config = oci.parse_json(config_bytes, f"{source.label}: config {oci.short(config_desc.digest)}")
    diff_ids = oci.config_diff_ids(config, f"{source.label}: config {oci.short(config_desc.digest)}")
    unsafe_layers = unsafe.get("layers")
    if not isinstance(unsafe_layers, list) or len(unsafe_layers) != len(diff_ids):
        raise UserError(f"{what}: the number of layers does not match the config's diff_ids")
    layers = []
    for unsafe_layer, diff_id in zip(unsafe_layers, diff_ids):
        d = oci.parse_descriptor(unsafe_layer, what)
        if d.media_type and d.media_type not in oci.LAYER_MEDIA_TYPES:
            raise UserError(f"{what}: layer {oci.short(d.digest)} has unsupported media type {d.media_type!r}")
        layers.append(SourceLayer(blob_path(d.digest), d.digest, d.size, diff_id, d.media_type))
    return SourceImage(config_bytes, config_desc.digest, layers)


def write_archive(out, images, open_blob, progress=None):
    """Write an OCI image layout as a tar to the binary stream `out`.

    `images` is a list of (config_bytes, [LayerInfo, ...], names); each name
    becomes an index entry annotated with org.opencontainers.image.ref.name.
    `open_blob(layer)` returns a readable stream of the stored layer blob.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        add_bytes(tf, OCI_LAYOUT_FILE, oci.canonical_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION}))
        index_entries, blobs = [], {}
        for config_bytes, layers, names in images:
            config_digest = oci.sha256_digest(config_bytes)
            manifest = oci.oci_manifest(config_digest, len(config_bytes), layers)
            manifest_desc = oci.Descriptor(oci.MT_OCI_MANIFEST, oci.sha256_digest(manifest), len(manifest))
            for name in names or [None]:
                entry = manifest_desc.to_json()
                if name:
                    entry["annotations"] = {oci.ANNOTATION_REF_NAME: name}
                index_entries.append(entry)
            blobs[manifest_desc.digest] = manifest
            blobs[config_digest] = config_bytes
            for layer in layers:
                blobs.setdefault(layer.digest, layer)
        add_bytes(tf, oci.OCI_INDEX_FILE, oci.canonical_json(
            {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": index_entries}))
        for digest in sorted(blobs):
            blob = blobs[digest]
            if isinstance(blob, bytes):
                add_bytes(tf, blob_path(digest), blob)
            else:
                if progress:
                    progress.phase(f"save layer {oci.short(digest)}", blob.size)
                with open_blob(blob) as f:
                    add_file(tf, blob_path(digest), CountingReader(f, progress), blob.size)
