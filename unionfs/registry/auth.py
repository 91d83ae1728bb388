"""Credentials and registry auth.

Credentials live in the containers auth file (containers-auth.json(5)), the
file podman, skopeo and buildah share: ``{"auths": {"HOST[:PORT]": {"auth":
base64("USER:PASSWORD")}}}``. We write ``$REGISTRY_AUTH_FILE``, else
``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/UID/auth.json``
without it), mode 0600; we read it, then ``~/.config/containers/auth.json``,
then docker's ``~/.docker/config.json``.

Auth follows the registry's ``WWW-Authenticate`` challenge (RFC 7235, the
distribution token spec): Basic sends the credentials with every request;
Bearer asks the challenge's realm for a token scoped to what the request needs
(``repository:REPO:pull,push``), keeps it until it expires and asks again
when the registry answers 401.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass

from unionfs.errors import UserError

ENV_AUTH_FILE = "REGISTRY_AUTH_FILE"
AUTHS = "auths"
# A token whose response names no lifetime lives this long (token spec).
DEFAULT_TOKEN_SECONDS = 60
# Ask for a new token this long before the old one expires.
TOKEN_SLACK_SECONDS = 10


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self):          # never show the password, not even in a traceback
        return f"Credentials({self.username!r}, ***)"


def auth_file() -> str:
    """The auth file `login` writes."""
    env = os.environ.get(ENV_AUTH_FILE)
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
    return os.path.join(runtime, "containers", "auth.json")


def _read_files() -> list[str]:
    """Every file credentials are read from, in order."""
    return [auth_file(), os.path.expanduser("~/.config/containers/auth.json"),
            os.path.expanduser("~/.docker/config.json")]


def _key_host(key: str) -> str:
    """An auths key as a host: docker writes `https://index.docker.io/v1/`."""
    host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


def _load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"auth file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(AUTHS, {}), dict):
        raise UserError(f"auth file {path}: not a containers auth file (no \"auths\" object)")
    return data


def lookup(registry: str) -> Credentials | None:
    """Stored credentials for `registry` (HOST[:PORT]), or None."""
    for path in _read_files():
        for key, entry in _load(path).get(AUTHS, {}).items():
            if _key_host(key) == registry and isinstance(entry, dict) and entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    sep = ""
                if not sep:
                    raise UserError(f"auth file {path}: the entry for {registry} is not base64 USER:PASSWORD")
                return Credentials(user, password)
    return None


def _write(path: str, data: dict):
    """Replace the auth file atomically; it is 0600 from its first byte."""
    d = os.path.dirname(path) or "."
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".auth.json-")   # mkstemp makes it 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent="\t")
                f.write("\n")
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise UserError(f"auth file {path}: cannot write it: {e.strerror}") from None


def store(registry: str, creds: Credentials) -> str:
    path = auth_file()
    data = _load(path)
    auths = data.setdefault(AUTHS, {})
    for key in [k for k in auths if _key_host(k) == registry]:
        del auths[key]
    raw = f"{creds.username}:{creds.password}".encode()
    auths[registry] = {"auth": base64.b64encode(raw).decode()}
    _write(path, data)
    return path


def remove(registry: str) -> bool:
    """Forget `registry` in the auth file we write; False if it was not there."""
    path = auth_file()
    data = _load(path)
    auths = data.get(AUTHS, {})
    keys = [k for k in auths if _key_host(k) == registry]
    if not keys:
        return False
    for key in keys:
        del auths[key]
    _write(path, data)
    return True


# -- challenges and tokens -----------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass
class Challenge:
    scheme: str              # "basic" or "bearer", lower case
    params: dict


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a WWW-Authenticate header (registries send one)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    value: str
    expires: float


class Authenticator:
    """What to send in `Authorization` for a set of scopes; thread-safe.

    `fetch_token(challenge, scopes, creds)` does the HTTP to the realm and
    returns (token, lifetime seconds); it is given by the client, which owns
    the connection settings."""

    def __init__(self, registry: str, creds: Credentials | None, fetch_token):
        self.registry = registry
        self.creds = creds
        self._fetch_token = fetch_token
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple, _Token] = {}
        self._lock = threading.Lock()

    @property
    def challenged(self) -> bool:
        return self._challenge is not None

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization value for a request needing `scopes`, once the
        registry has told us how it authenticates."""
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self.creds.basic_header() if self.creds else None
        if ch.scheme == "bearer":
            with self._lock:
                token = self._tokens.get(scopes)
                if token is None or token.expires < time.monotonic():
                    value, lifetime = self._fetch_token(ch, scopes, self.creds)
                    lifetime -= min(TOKEN_SLACK_SECONDS, lifetime / 2)
                    token = self._tokens[scopes] = _Token(value, time.monotonic() + lifetime)
            return f"Bearer {token.value}"
        raise UserError(f"registry {self.registry}: unsupported authentication scheme {ch.scheme!r}")

    def challenge(self, header: str | None, scopes: tuple[str, ...], sent: str | None) -> bool:
        """Learn from a 401. True if asking once more may succeed (the
        client asks again at most once per request)."""
        ch = parse_challenge(header)
        if ch is None:
            return False
        with self._lock:
            self._challenge = ch
            self._tokens.pop(scopes, None)
        if ch.scheme == "bearer":
            return True          # a fresh token (the one sent may have expired early)
        if ch.scheme == "basic":
            return sent is None and self.creds is not None
        return False
