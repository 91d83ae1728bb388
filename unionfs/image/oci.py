"""OCI / Docker image formats: media types, digests, verified blob streams.

Everything that reads a blob goes through `VerifyingReader`, which hashes the
bytes as they stream past and refuses the blob at EOF if its digest (or size)
is not the one the manifest promised; `open_layer_stream` stacks a
decompressor and a second verifier (the diff_id) on top of it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from dataclasses import dataclass, field

from unionfs.errors import UserError

# Media types (OCI image-spec v1 and their Docker schema-2 equivalents).
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_MEDIA_TYPES = (MT_OCI_INDEX, MT_DOCKER_MANIFEST_LIST)
MANIFEST_MEDIA_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
# Layer media types we can unpack (compression is sniffed from the bytes anyway).
LAYER_MEDIA_TYPES = (
    MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, MT_DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
# The layer media type we record for a blob, by its actual compression.
LAYER_MEDIA_TYPE_FOR = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}

# OCI image layout files and annotations.
OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX_FILE = "index.json"
OCI_BLOBS_DIR = "blobs"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# containerd / Docker 25+ put the full image name here, the tag alone in ref.name.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_TAG = "latest"


def with_default_tag(name: str) -> str:
    """NAME -> NAME:latest; NAME:TAG and NAME@DIGEST as they are (a ':'
    before the last '/' is a registry's port)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in last else f"{name}:{DEFAULT_TAG}"


# Compression magic numbers.
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# What a corrupt or truncated (compressed) blob raises while being read.
_READ_ERRORS = (OSError, EOFError, zlib.error)
try:
    import zstandard as _zstandard
    _READ_ERRORS += (_zstandard.ZstdError,)
except ImportError:
    pass

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(unsafe_digest, what: str) -> str:
    """Return `unsafe_digest` if it is a well-formed sha256 digest, else refuse."""
    if not isinstance(unsafe_digest, str) or not _DIGEST_RE.match(unsafe_digest):
        raise UserError(f"{what}: malformed digest {unsafe_digest!r} (only sha256 is supported)")
    return unsafe_digest


def digest_hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def short(digest: str) -> str:
    """`sha256:ab12cd34ef56…` — how messages name a blob."""
    return digest[:19] + "…"


def canonical_json(obj) -> bytes:
    """The JSON bytes we write for configs, manifests and indexes: stable for
    equal input, so equal images get equal digests."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: not valid JSON ({e})") from None


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)
    platform: dict | None = None        # in an index: which os/architecture

    def to_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def parse_descriptor(unsafe, what: str) -> Descriptor:
    """A descriptor from untrusted JSON (an OCI layout's index or manifest,
    or a registry's): digest and size checked, annotations and platform kept
    only if they are objects."""
    if not isinstance(unsafe, dict):
        raise UserError(f"{what}: malformed descriptor (not an object)")
    digest = check_digest(unsafe.get("digest"), what)
    size = unsafe.get("size")
    if not isinstance(size, int) or size < 0:
        raise UserError(f"{what}: descriptor {short(digest)} has no valid size")
    annotations, platform = unsafe.get("annotations"), unsafe.get("platform")
    return Descriptor(str(unsafe.get("mediaType", "")), digest, size,
                      annotations if isinstance(annotations, dict) else {},
                      platform if isinstance(platform, dict) else None)


@dataclass
class LayerInfo:
    """One layer of a stored image. `digest`/`size`/`media_type` describe the
    blob as stored (possibly compressed), `diff_id`/`tar_size` the tar."""
    digest: str
    size: int
    media_type: str
    diff_id: str
    tar_size: int

    def to_json(self) -> dict:
        return {"digest": self.digest, "size": self.size, "mediaType": self.media_type,
                "diff_id": self.diff_id, "tar_size": self.tar_size}

    @classmethod
    def from_json(cls, d: dict) -> "LayerInfo":
        return cls(d["digest"], d["size"], d["mediaType"], d["diff_id"], d["tar_size"])

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


def oci_manifest(config_digest: str, config_size: int, layers: list[LayerInfo]) -> bytes:
    """The OCI manifest we write for an image (deterministic bytes)."""
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": Descriptor(MT_OCI_CONFIG, config_digest, config_size).to_json(),
        "layers": [layer.descriptor().to_json() for layer in layers],
    })


def config_diff_ids(config: dict, what: str) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    unsafe_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(unsafe_ids, list):
        raise UserError(f"{what}: config has no rootfs.diff_ids")
    return [check_digest(d, f"{what}: diff_id") for d in unsafe_ids]


class VerifyingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through and, at EOF, checks
    the digest (and the size, if known). Raises UserError naming `what`.
    With `digest=None` it only computes it (`.digest`, after `drain()`)."""

    def __init__(self, raw, digest: str | None, what: str, size: int | None = None, progress=None):
        self._raw = raw
        self._expected = digest
        self._size = size
        self._what = what
        self._hash = hashlib.sha256()
        self._progress = progress
        self.count = 0
        self.verified = False
        self.digest = None

    def readable(self):
        return True

    def readinto(self, b):
        try:
            data = self._raw.read(len(b))
        except UserError:
            raise
        except _READ_ERRORS as e:
            raise UserError(f"{self._what}: cannot read the blob: {e}") from None
        n = len(data)
        b[:n] = data
        if n:
            self._hash.update(memoryview(b)[:n])
            self.count += n
            if self._size is not None and self.count > self._size:
                raise UserError(f"{self._what}: blob is larger than its descriptor says ({self._size} bytes)")
            if self._progress:
                self._progress.advance(n)
        else:
            self._finish()
        return n

    def _finish(self):
        if self.verified:
            return
        if self._size is not None and self.count != self._size:
            raise UserError(f"{self._what}: blob is {self.count} bytes, its descriptor says {self._size}")
        actual = self.digest = "sha256:" + self._hash.hexdigest()
        if self._expected is not None and actual != self._expected:
            raise UserError(f"{self._what}: digest mismatch: expected {short(self._expected)}, got {short(actual)}")
        self.verified = True

    def drain(self):
        """Read to EOF (trailing padding included) and verify."""
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass
        self._finish()


def sniff_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def decompressor(stream, compression: str, what: str):
    """A readable stream of the tar inside `stream` (a BufferedReader)."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{what}: layer is zstd-compressed; install the 'zstandard' "
                            "package (pip install 'unionfs[zstd]') to load it") from None
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


class LayerStream:
    """Open a layer blob for reading its tar, verifying both digests.

    `blob` is a raw readable stream of the (maybe compressed) blob; `digest`
    may be None when the format does not name it (docker-archive). Read the
    tar from `.tar`; call `.finish()` after the tar is consumed: it drains both
    streams and raises UserError on any digest mismatch.
    """

    def __init__(self, blob, digest: str | None, diff_id: str, what: str,
                 size: int | None = None, progress=None):
        self.what = what
        self.outer = VerifyingReader(blob, digest, what, size, progress)
        buffered = io.BufferedReader(self.outer, CHUNK)
        self.compression = sniff_compression(buffered.peek(4)[:4])
        self.inner = VerifyingReader(decompressor(buffered, self.compression, what),
                                     diff_id, f"{what}: diff_id")
        self.tar = io.BufferedReader(self.inner, CHUNK)
        self._buffered = buffered

    def finish(self):
        while self.tar.read(CHUNK):
            pass
        self.inner.drain()
        while self._buffered.read(CHUNK):
            pass
        self.outer.drain()

    @property
    def digest(self) -> str:
        """The blob's digest (valid after `finish()`)."""
        return self.outer.digest

    @property
    def tar_size(self) -> int:
        return self.inner.count
