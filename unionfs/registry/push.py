"""Push: blobs the registry lacks, then the manifest.

Each blob (layers in parallel, then the config) is first asked for with
HEAD and skipped if the registry has it; else mounted from another
repository of the same registry that we know holds it (the store remembers
where blobs were pulled from and pushed to); else uploaded: POST opens an
upload session, one PUT streams the blob from the store with its digest
(monolithic upload; the blob is read in 1 MiB pieces, never whole). A
failed upload is tried again from a new session. The manifest goes last, so
the tag never names an image whose blobs are not all there.
"""

from __future__ import annotations

import threading
from urllib.parse import quote

from unionfs.errors import UserError
from unionfs.image import oci
from unionfs.image.progress import size_text
from unionfs.image.store import Image, Store
from unionfs.registry import manifest as mf
from unionfs.registry.client import Client, Transient
from unionfs.registry.parallel import run_all
from unionfs.registry.reference import Reference

PARALLEL_BLOBS = 4
BLOB_ATTEMPTS = 3


class _Cancelled(Exception):
    """Another blob failed or the user pressed Ctrl-C: stop sending."""


def push(store: Store, client: Client, image: Image, ref: Reference, fmt: str, progress) -> str:
    """Push `image` as `ref`; return the manifest digest."""
    what = f"push {ref}"
    scopes = (f"repository:{ref.repo}:pull,push",)
    repository = f"{ref.registry}/{ref.repo}"
    client.ping()
    config_bytes = store.config_bytes(image)
    manifest_bytes, media_type = mf.build(fmt, image.id, len(config_bytes), image.layers)
    cancel = threading.Event()

    def send(digest: str, size: int, open_blob, kind="blob"):
        _send_blob(client, store, ref, repository, scopes, digest, size, open_blob,
                   f"Copying {kind} {oci.short(digest)}", progress, cancel)

    blobs = {}
    for layer in image.layers:
        blobs.setdefault(layer.digest, lambda layer=layer: send(layer.digest, layer.size,
                                                                lambda: store.open_blob(layer)))
    try:
        run_all(list(blobs.values()), PARALLEL_BLOBS, cancel.set)
        send(image.id, len(config_bytes), lambda: _BytesReader(config_bytes), "config")
        r = client.request("PUT", f"/v2/{ref.repo}/manifests/{ref.ref}", scopes, what=f"{what}: manifest",
                           ok=(201,), headers={"Content-Type": media_type}, body=lambda: manifest_bytes)
    finally:
        progress.finish()
    digest = oci.sha256_digest(manifest_bytes)
    said = r.headers.get("Docker-Content-Digest")
    if said and said != digest:
        raise UserError(f"{what}: the registry stored the manifest as {said}, expected {digest}")
    with store.locked():
        store.note_blob_sources([image.id, *blobs], repository)
    return digest


class _BytesReader:
    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n):
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _send_blob(client, store, ref, repository, scopes, digest, size, open_blob, label, progress, cancel):
    what = f"push {ref}: blob {oci.short(digest)}"
    blob_path = f"/v2/{ref.repo}/blobs/{digest}"
    if client.request("HEAD", blob_path, scopes, what=what, missing_ok=True).status_code == 200:
        progress.line(f"{label}: already exists")
        return
    location = None
    for source in store.blob_sources(digest):
        registry, _, from_repo = source.partition("/")
        if registry != ref.registry or from_repo == ref.repo:
            continue
        r = client.request("POST", f"/v2/{ref.repo}/blobs/uploads/?mount={digest}&from={quote(from_repo)}",
                           scopes + (f"repository:{from_repo}:pull",), what=what, ok=(201, 202))
        if r.status_code == 201:
            progress.line(f"{label}: mounted from {from_repo}")
            return
        location = r.headers.get("Location")   # the registry opened an upload instead
        break
    task = progress.task(label, size)
    for attempt in range(BLOB_ATTEMPTS):
        try:
            if location is None:
                r = client.request("POST", f"/v2/{ref.repo}/blobs/uploads/", scopes, what=what, ok=(202,))
                location = r.headers.get("Location")
            if not location:
                raise UserError(f"{what}: the registry opened an upload without a Location")
            url = location + ("&" if "?" in location else "?") + "digest=" + quote(digest)
            r = client.request("PUT", url, scopes, what=what, ok=(201,), attempts=1,
                               headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                               body=lambda: _chunks(open_blob, task, cancel))
            break
        except Transient:
            if attempt + 1 == BLOB_ATTEMPTS:
                raise
            location = None
            task.reset()
    said = r.headers.get("Docker-Content-Digest")
    if said and said != digest:
        raise UserError(f"{what}: the registry stored it as {said}")
    task.done(f"done ({size_text(size)})")


def _chunks(open_blob, task, cancel):
    """The blob in CHUNK pieces, as httpx sends a streamed body."""
    with open_blob() as f:
        while True:
            if cancel.is_set():
                raise _Cancelled()
            chunk = f.read(oci.CHUNK)
            if not chunk:
                return
            task.advance(len(chunk))
            yield chunk
