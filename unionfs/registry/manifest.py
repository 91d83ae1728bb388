"""Manifests and indexes as the registry serves them: fetched, verified
against the digest that named them, parsed into descriptors; and the
manifest push writes (OCI or Docker schema 2)."""

from __future__ import annotations

from dataclasses import dataclass

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.oci import Descriptor, LayerInfo

# Manifests, indexes and configs larger than this are refused.
MAX_MANIFEST_SIZE = 4 << 20
# What push --format takes.
FORMATS = ("oci", "docker")
ACCEPT = ", ".join((oci.MT_OCI_INDEX, oci.MT_DOCKER_MANIFEST_LIST, oci.MT_OCI_MANIFEST, oci.MT_DOCKER_MANIFEST))
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                     "application/vnd.docker.distribution.manifest.v1+prettyjws")
# The layer media type each push format names a blob by, by its compression.
_DOCKER_LAYER_TYPE = {"gzip": oci.MT_DOCKER_LAYER_GZIP, "none": MT_DOCKER_LAYER}


@dataclass
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


@dataclass
class Index:
    manifests: list[Descriptor]


def platform_str(p: dict) -> str:
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def parse(data: bytes, content_type: str, what: str) -> Manifest | Index:
    doc = oci.parse_json(data, what)
    if not isinstance(doc, dict):
        raise UserError(f"{what}: not a manifest")
    media_type = doc.get("mediaType") or content_type.split(";")[0].strip()
    if media_type in MT_DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise UserError(f"{what}: Docker schema 1 manifests are not supported")
    if media_type in oci.INDEX_MEDIA_TYPES or (not media_type and "manifests" in doc):
        unsafe = doc.get("manifests")
        if not isinstance(unsafe, list):
            raise UserError(f"{what}: index without manifests")
        return Index([oci.parse_descriptor(d, f"{what}: index entry") for d in unsafe])
    if media_type in oci.MANIFEST_MEDIA_TYPES or (not media_type and "config" in doc):
        unsafe_layers = doc.get("layers")
        if not isinstance(unsafe_layers, list):
            raise UserError(f"{what}: manifest without layers")
        return Manifest(oci.parse_descriptor(doc.get("config"), f"{what}: config"),
                        [oci.parse_descriptor(d, f"{what}: layer") for d in unsafe_layers])
    raise UserError(f"{what}: unsupported manifest media type {media_type!r}")


def _read_limited(response, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) > MAX_MANIFEST_SIZE:
            response.close()
            raise UserError(f"{what}: larger than {MAX_MANIFEST_SIZE >> 20} MiB")
    return bytes(data)


def fetch_manifest(client, repo: str, ref: str, scopes, expected: str | None, what: str):
    """(Manifest or Index, raw bytes); checked against `expected` if a digest."""
    r = client.request("GET", f"/v2/{repo}/manifests/{ref}", scopes, what=f"{what}: manifest",
                       headers={"Accept": ACCEPT}, stream=True)
    try:
        data = _read_limited(r, f"{what}: manifest")
    finally:
        r.close()
    actual = oci.sha256_digest(data)
    if expected and actual != expected:
        raise UserError(f"{what}: manifest digest mismatch: expected {oci.short(expected)}, "
                        f"got {oci.short(actual)}")
    return parse(data, r.headers.get("Content-Type", ""), f"{what}: manifest {oci.short(actual)}"), data


def fetch_small_blob(client, repo: str, desc: Descriptor, scopes, what: str) -> bytes:
    """A config (or other small blob), verified against its descriptor."""
    if desc.size > MAX_MANIFEST_SIZE:
        raise UserError(f"{what}: {desc.size} bytes is too large")
    r = client.request("GET", f"/v2/{repo}/blobs/{desc.digest}", scopes, what=what, stream=True)
    try:
        data = _read_limited(r, what)
    finally:
        r.close()
    actual = oci.sha256_digest(data)
    if actual != desc.digest or len(data) != desc.size:
        raise UserError(f"{what}: digest mismatch: expected {oci.short(desc.digest)}, got {oci.short(actual)}")
    return data


def _compression(media_type: str) -> str:
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    return "zstd" if media_type.endswith("+zstd") else "none"


def build(fmt: str, config_digest: str, config_size: int, layers: list[LayerInfo]) -> tuple[bytes, str]:
    """The manifest push writes, and its media type. The layer media types
    follow each blob's compression (the store sniffed it)."""
    if fmt == "oci":
        return oci.oci_manifest(config_digest, config_size, layers), oci.MT_OCI_MANIFEST
    layer_descs = []
    for layer in layers:
        compression = _compression(layer.media_type)
        if compression not in _DOCKER_LAYER_TYPE:
            raise UserError(f"layer {oci.short(layer.digest)} is {compression}-compressed, which the docker "
                            "format cannot describe: push with --format oci")
        layer_descs.append({"mediaType": _DOCKER_LAYER_TYPE[compression], "size": layer.size,
                            "digest": layer.digest})
    return oci.canonical_json({
        "schemaVersion": 2,
        "mediaType": oci.MT_DOCKER_MANIFEST,
        "config": {"mediaType": oci.MT_DOCKER_CONFIG, "size": config_size, "digest": config_digest},
        "layers": layer_descs,
    }), oci.MT_DOCKER_MANIFEST
