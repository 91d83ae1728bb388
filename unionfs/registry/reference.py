"""Image references as docker and podman write them:
``[REGISTRY/]REPO[:TAG][@sha256:HEX]``.

The first path component names a registry when it has a dot, a colon or is
``localhost``; otherwise the reference is on Docker Hub (``busybox`` is
``docker.io/library/busybox``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from unionfs.errors import UserError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"    # where docker.io's v2 API lives
DOCKER_HUB_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REGISTRY_RE = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    registry: str            # host[:port] as the user wrote it (docker.io for Hub)
    repo: str                # path inside the registry
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return api_host(self.registry)

    @property
    def ref(self) -> str:
        """What the manifest endpoint takes: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """REGISTRY/REPO:TAG, the name the store keeps a pulled image under."""
        return f"{self.registry}/{self.repo}:{self.tag or DEFAULT_TAG}"

    def __str__(self):
        s = f"{self.registry}/{self.repo}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def api_host(registry: str) -> str:
    """Where a registry's v2 API is served (Docker Hub's is not at docker.io)."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def split_registry(unsafe: str) -> tuple[str, str] | None:
    """(registry, rest) when the first component of `unsafe` names a registry."""
    first, sep, rest = unsafe.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None


def parse(unsafe_ref: str, need_registry: bool = False) -> Reference:
    """Parse a reference; raise UserError naming what is wrong."""
    what = f"reference {unsafe_ref!r}"
    rest, digest = unsafe_ref, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST_RE.match(digest):
            raise UserError(f"{what}: malformed digest (sha256:64 hex digits expected)")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not _TAG_RE.match(tag):
            raise UserError(f"{what}: invalid tag {tag!r}")
    split = split_registry(rest)
    if split:
        registry, repo = split
        if not _REGISTRY_RE.match(registry):
            raise UserError(f"{what}: invalid registry {registry!r}")
    elif need_registry:
        raise UserError(f"{what}: name the registry (REGISTRY/REPO[:TAG], e.g. localhost:5000/{rest})")
    else:
        registry, repo = DOCKER_HUB, rest
    if registry in (DOCKER_HUB, "index.docker.io"):
        registry = DOCKER_HUB
        if "/" not in repo:
            repo = f"{DOCKER_HUB_NAMESPACE}/{repo}"
    if not _REPO_RE.match(repo):
        raise UserError(f"{what}: invalid repository name {repo!r} (lower case letters, digits, . _ - /)")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repo, tag, digest)


def registry_host(unsafe: str) -> str:
    """A registry as `login`/`logout` take it: HOST[:PORT], maybe written as a
    URL or with a path (docker accepts both); Docker Hub's names fold to docker.io."""
    host = re.sub(r"^[a-z]+://", "", unsafe.strip()).split("/", 1)[0]
    if not host or not _REGISTRY_RE.match(host):
        raise UserError(f"registry {unsafe!r}: not a HOST[:PORT]")
    if host in ("index.docker.io", DOCKER_HUB_API):
        return DOCKER_HUB
    return host
