"""Pull: manifest (through an index to one platform), config, layers.

Nothing reaches the store before every byte is verified: the manifest and
config are fetched and checked first, then layers stream in parallel through
`Staging.import_layer` (blob digest and diff_id checked while the layer is
stored and unpacked in the store's tmp/), and only then `add_image` renames
it all in. Any failure (network, digest, disk, Ctrl-C) throws the staging
away: the store is as it was.
"""

from __future__ import annotations

import platform as host_platform
import socket
import threading
from dataclasses import dataclass

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.progress import size_text
from unionfs.image.store import Image, Staging, Store
from unionfs.registry import manifest as mf
from unionfs.registry.client import Client, Transient
from unionfs.registry.parallel import run_all
from unionfs.registry.reference import Reference

PARALLEL_LAYERS = 4
# Layer media types a pull takes: what the store unpacks, and Docker's
# uncompressed layer (the store sniffs the compression from the bytes).
LAYER_MEDIA_TYPES = oci.LAYER_MEDIA_TYPES + (mf.MT_DOCKER_LAYER,)
# Download attempts of one layer facing transient network failures.
LAYER_ATTEMPTS = 3

# platform.machine() -> OCI architecture and variant (as Go's GOARCH spells them).
_MACHINE_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "i686": ("386", None), "i386": ("386", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "ppc64le": ("ppc64le", None), "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self):
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def parse_platform(unsafe: str) -> Platform:
    parts = unsafe.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"--platform {unsafe!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
    return Platform(*parts)


def host() -> Platform:
    arch, variant = _MACHINE_ARCH.get(host_platform.machine(), (host_platform.machine(), None))
    return Platform("linux", arch, variant)


def choose(index: mf.Index, want: Platform, explicit: bool, what: str) -> mf.Descriptor:
    """The index entry for `want`. The host's variant is a preference (an
    arm64 image without a variant runs on arm64/v8); an explicit one must match."""
    candidates = [d for d in index.manifests
                  if d.platform and d.platform.get("os") == want.os
                  and d.platform.get("architecture") == want.architecture]
    if want.variant:
        exact = [d for d in candidates if d.platform.get("variant") == want.variant]
        if exact or explicit:
            candidates = exact
    if not candidates:
        have = ", ".join(sorted({mf.platform_str(d.platform) for d in index.manifests if d.platform})) or "none"
        raise UserError(f"{what}: no image for {want} (the index has: {have}); choose one with --platform")
    return candidates[0]


class _Cancelled(Exception):
    """Another layer failed or the user pressed Ctrl-C: stop reading."""


class _Transfers:
    """The layer downloads of one pull, and a way to stop them all at once:
    shutting a socket down wakes a thread blocked reading it, so a stalled
    download cannot hold up Ctrl-C or the failure of another layer."""

    def __init__(self):
        self.cancelled = threading.Event()
        self._open: set = set()
        self._lock = threading.Lock()

    def opened(self, response):
        with self._lock:
            self._open.add(response)
        if self.cancelled.is_set():
            self._shutdown(response)

    def closed(self, response):
        with self._lock:
            self._open.discard(response)

    def cancel(self):
        self.cancelled.set()
        with self._lock:
            responses = list(self._open)
        for r in responses:
            self._shutdown(r)

    @staticmethod
    def _shutdown(response):
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass             # already closed


class _BlobStream:
    """A readable stream of one blob's HTTP response body (no decoding)."""

    def __init__(self, response, transfers: _Transfers, what: str):
        self._r, self._transfers, self._what = response, transfers, what
        self._chunks = response.iter_raw()    # as they arrive: re-chunking would copy every byte
        self._rest = b""
        transfers.opened(response)

    def read(self, n=-1):
        if self._transfers.cancelled.is_set():
            raise _Cancelled()
        if not self._rest:
            try:
                self._rest = next(self._chunks, b"")
            except Exception as e:           # httpx's stream errors: try the layer again
                if self._transfers.cancelled.is_set():
                    raise _Cancelled() from None
                if type(e).__module__.startswith(("httpx", "httpcore")):
                    raise Transient(f"{self._what}: connection lost: {e or type(e).__name__}") from None
                raise
        if n is None or n < 0 or n >= len(self._rest):
            data, self._rest = self._rest, b""
        else:
            data, self._rest = self._rest[:n], self._rest[n:]
        return data

    def close(self):
        self._transfers.closed(self._r)
        self._r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pull(store: Store, client: Client, ref: Reference, want: Platform | None, progress) -> Image:
    scopes = (f"repository:{ref.repo}:pull",)
    what = f"pull {ref}"
    client.ping()
    image_manifest, _ = mf.fetch_manifest(client, ref.repo, ref.ref, scopes, ref.digest, what)
    if isinstance(image_manifest, mf.Index):
        entry = choose(image_manifest, want or host(), want is not None, what)
        image_manifest, _ = mf.fetch_manifest(client, ref.repo, entry.digest, scopes, entry.digest, what)
        if not isinstance(image_manifest, mf.Manifest):
            raise UserError(f"{what}: the index entry for {mf.platform_str(entry.platform)} is not an image manifest")
    config_bytes = mf.fetch_small_blob(client, ref.repo, image_manifest.config, scopes, f"{what}: config")
    config = oci.parse_json(config_bytes, f"{what}: config")
    diff_ids = oci.config_diff_ids(config, f"{what}: config")
    if len(diff_ids) != len(image_manifest.layers):
        raise UserError(f"{what}: the manifest has {len(image_manifest.layers)} layers, "
                        f"the config {len(diff_ids)} diff_ids")
    for desc in image_manifest.layers:
        if desc.media_type not in LAYER_MEDIA_TYPES:
            raise UserError(f"{what}: layer {oci.short(desc.digest)} has media type {desc.media_type!r}, "
                            "which unionfs cannot unpack")
    names = [ref.name] if ref.tag else []
    with store.locked():
        staging = Staging(store, progress.warn, progress)
        try:
            layers = _fetch_layers(client, ref, scopes, staging, image_manifest.layers, diff_ids, progress)
            image = store.add_image(staging, config_bytes, layers, names)
            store.note_blob_sources([image_manifest.config.digest] + [d.digest for d in image_manifest.layers],
                                    f"{ref.registry}/{ref.repo}")
        except OSError as e:
            raise UserError(f"{what}: {e.filename or store.root}: {e.strerror}") from None
        finally:
            staging.cleanup()
    return image


def _fetch_layers(client, ref, scopes, staging, descs, diff_ids, progress):
    """Import every layer (in parallel); in manifest order."""
    transfers = _Transfers()
    todo = {}                    # (digest, diff_id) -> descriptor: one download per blob
    for desc, diff_id in zip(descs, diff_ids):
        todo.setdefault((desc.digest, diff_id), desc)

    def one(key):
        desc = todo[key]
        digest, diff_id = key
        label = f"Copying blob {oci.short(digest)}"
        if staging.has_layer_blob(digest, diff_id):
            progress.line(f"{label}: already in the store")
            return staging.layer_info(digest, diff_id)
        what = f"pull {ref}: layer {oci.short(digest)}"

        def open_blob():
            r = client.request("GET", f"/v2/{ref.repo}/blobs/{digest}", scopes, what=what, stream=True)
            return _BlobStream(r, transfers, what)
        task = progress.task(label, desc.size)
        for attempt in range(LAYER_ATTEMPTS):
            if transfers.cancelled.is_set():
                raise _Cancelled()
            try:
                info = staging.import_layer(open_blob, digest, desc.size, diff_id, what, task)
                break
            except Transient:
                if attempt + 1 == LAYER_ATTEMPTS:
                    raise
                task.reset()
        task.done(f"done ({size_text(desc.size)})")
        return info

    try:
        results = run_all([lambda key=key: one(key) for key in todo], PARALLEL_LAYERS, transfers.cancel)
    finally:
        progress.finish()
    infos = dict(zip(todo, results))
    return [infos[(desc.digest, diff_id)] for desc, diff_id in zip(descs, diff_ids)]
