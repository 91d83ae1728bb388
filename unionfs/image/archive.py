"""Read access to an image archive: a directory or a (maybe compressed) tar.

`open_source(path)` gives a `Source`; `read_images(source)` finds out which
format it holds (docker-archive, with or without an OCI layout inside, or an
OCI image layout) and returns the images it describes, unverified: blobs are
verified by the store while it streams them.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field

from unionfs.errors import UserError

# JSON files (manifests, configs, indexes) larger than this are refused.
MAX_JSON_SIZE = 16 << 20


@dataclass
class SourceLayer:
    path: str                 # inside the source
    digest: str | None        # of the blob, when the format names it
    size: int | None          # of the blob, when the format names it
    diff_id: str              # from the image config
    media_type: str | None = None


@dataclass
class SourceImage:
    config_bytes: bytes
    config_digest: str
    layers: list[SourceLayer]
    names: list[str] = field(default_factory=list)


def normalize_member(unsafe_name: str) -> str | None:
    """A member / file name inside an archive, relative and without `..`;
    None if it is not one we would ever open."""
    name = posixpath.normpath(unsafe_name.lstrip("/")) if unsafe_name else ""
    if name in ("", ".") or name == ".." or name.startswith("../"):
        return None
    return name


class Source:
    label: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str):
        """A readable binary stream of file `name`."""
        raise NotImplementedError

    def read(self, name: str, what: str) -> bytes:
        with self.open_checked(name, what) as f:
            data = f.read(MAX_JSON_SIZE + 1)
        if len(data) > MAX_JSON_SIZE:
            raise UserError(f"{self.label}: {what} {name!r} is too large")
        return data

    def open_checked(self, unsafe_name: str, what: str):
        name = normalize_member(unsafe_name)
        if name is None or not self.exists(name):
            raise UserError(f"{self.label}: {what} {unsafe_name!r} is missing from the archive")
        return self.open(name)

    def close(self):
        pass


class DirSource(Source):
    def __init__(self, path: str, label: str):
        self.root = path
        self.label = label

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def open(self, name: str):
        return open(self._path(name), "rb")


class TarSource(Source):
    def __init__(self, path: str, label: str):
        self.label = label
        try:
            self.tf = tarfile.open(path, "r:*")
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            reason = str(e).splitlines()[0].rstrip(":")
            raise UserError(f"{label}: not a readable tar archive ({reason})") from None
        self.members = {}
        for m in members:
            name = normalize_member(m.name)
            if name is not None and (m.isfile() or m.issym() or m.islnk()):
                self.members[name] = m

    def exists(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str):
        try:
            f = self.tf.extractfile(self.members[name])
        except (KeyError, tarfile.TarError) as e:
            raise UserError(f"{self.label}: cannot read {name!r} from the archive ({e})") from None
        if f is None:
            raise UserError(f"{self.label}: {name!r} in the archive is not a file")
        return f

    def close(self):
        self.tf.close()


def open_source(path: str) -> Source:
    label = f"load {path}"
    if os.path.isdir(path):
        return DirSource(path, label)
    if not os.path.exists(path):
        raise UserError(f"{label}: no such file or directory")
    return TarSource(path, label)


def read_images(source: Source) -> list[SourceImage]:
    from unionfs.image import dockerarchive, ocilayout
    if source.exists(dockerarchive.MANIFEST_FILE):
        return dockerarchive.read_images(source)
    if source.exists(ocilayout.OCI_LAYOUT_FILE):
        return ocilayout.read_images(source)
    raise UserError(f"{source.label}: neither a docker-archive (no manifest.json) "
                    "nor an OCI image layout (no oci-layout)")
