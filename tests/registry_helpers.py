"""Real registries for tests: Debian's docker-registry (distribution 2.8) on
127.0.0.1 and a free port, with its own storage dir, in three setups:

- "plain": http, anonymous;
- "basic": https with a CA made here (openssl) and htpasswd Basic auth;
- "token": https, `auth: token`, with a token issuer in this process that
  signs real JWTs (RS256, the signing certificate in the JWT's `x5c` header,
  the registry trusting it through `rootcertbundle`).

The registry reads every REGISTRY_* environment variable as configuration,
so it starts with an environment of our own, holding none of them. It is
stopped by pid at teardown, whatever the test did.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

REGISTRY_BIN = shutil.which("docker-registry")
USER, PASSWORD = "tester", "s3cret-pass"
SERVICE = "unionfs-test-registry"
ISSUER = "unionfs-test-issuer"
START_TIMEOUT = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def make_ca_and_cert(d: Path):
    """A CA, and a certificate for 127.0.0.1 it signed: d/ca.crt, d/server.{crt,key}."""
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=unionfs test CA",
          "-keyout", d / "ca.key", "-out", d / "ca.crt"])
    _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
          "-keyout", d / "server.key", "-out", d / "server.csr"])
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _run(["openssl", "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
          "-CAcreateserial", "-days", "2", "-extfile", d / "san.ext", "-out", d / "server.crt"])


# -- token issuer ----------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A token endpoint (the distribution token spec): Basic credentials in,
    a JWT granting the requested scopes out. Anonymous requests get a token
    with no access, as public token servers do for private repositories."""

    def __init__(self, d: Path, lifetime: int = 300):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        import datetime
        self.lifetime = lifetime
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = d / "token-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict] = []   # what was asked: {"user", "scopes"}
        self.port = free_port()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                issuer._answer(self)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64(sig)

    def _answer(self, h):
        q = parse_qs(urlparse(h.path).query)
        user = None
        authz = h.headers.get("Authorization", "")
        if authz.startswith("Basic "):
            u, _, p = base64.b64decode(authz[6:]).decode().partition(":")
            if (u, p) != (USER, PASSWORD):
                h.send_response(401)
                h.send_header("Content-Type", "application/json")
                h.end_headers()
                h.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
                return
            user = u
        scopes = q.get("scope", [])
        self.requests.append({"user": user, "scopes": scopes, "service": q.get("service", [None])[0]})
        access = []
        if user:
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = self.sign({"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + self.lifetime,
                           "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access})
        body = json.dumps({"token": token, "expires_in": self.lifetime,
                           "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# -- the registry --------------------------------------------------------------

@dataclass
class Registry:
    kind: str                      # plain | basic | token
    base: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    cert_dir: Path | None = None   # holds ca.crt for HOST:PORT (what --cert-dir takes)
    issuer: TokenIssuer | None = None
    log: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.base / "data"

    @property
    def tls_args(self) -> list[str]:
        """unionfs options to reach it."""
        if self.kind == "plain":
            return ["--tls-verify=false"]
        return ["--cert-dir", str(self.cert_dir)]

    def skopeo_args(self, direction: str) -> list[str]:
        """skopeo copy options for this registry as source ("src") or destination ("dest")."""
        if self.kind == "plain":
            return [f"--{direction}-tls-verify=false"]
        return [f"--{direction}-cert-dir", str(self.cert_dir)]

    def requests(self, method: str, path_part: str) -> int:
        """How many requests METHOD with `path_part` in the URI the registry answered."""
        n = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if "response completed" in line and f"http.request.method={method} " in line \
                    and path_part in line.split("http.request.uri=", 1)[-1].split(" ", 1)[0]:
                n += 1
        return n

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def start(self):
        self.base.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.kind in ("basic", "token"):
            make_ca_and_cert(self.base)
            config["http"]["tls"] = {"certificate": str(self.base / "server.crt"),
                                     "key": str(self.base / "server.key")}
            self.cert_dir = self.base / "certs.d" / self.host
            self.cert_dir.mkdir(parents=True)
            shutil.copy(self.base / "ca.crt", self.cert_dir / "ca.crt")
        if self.kind == "basic":
            htpasswd = self.base / "htpasswd"
            _run(["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD])
            config["auth"] = {"htpasswd": {"realm": "unionfs-test", "path": str(htpasswd)}}
        if self.kind == "token":
            self.issuer = TokenIssuer(self.base)
            config["auth"] = {"token": {"realm": self.issuer.realm, "service": SERVICE, "issuer": ISSUER,
                                        "rootcertbundle": str(self.issuer.bundle)}}
        cfg = self.base / "config.yml"
        cfg.write_text(json.dumps(config))           # JSON is YAML
        self.log = self.base / "registry.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start listening")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.issuer is not None:
            self.issuer.stop()


def start_registry(kind: str, base: Path) -> Registry:
    reg = Registry(kind, base)
    try:
        return reg.start()
    except BaseException:
        reg.stop()
        raise


def sha_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# -- images on disk ------------------------------------------------------------

def _write_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = layout / "blobs/sha256" / digest[7:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return digest


_MEDIA_SUFFIX = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}


def image_manifest(layout: Path, tars_compressed: list[tuple[bytes, str]], config: bytes) -> dict:
    """Write an image's blobs into `layout`; return its manifest's descriptor."""
    from image_helpers import compress
    layers = []
    for tar, how in tars_compressed:
        blob = compress(tar, how)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + _MEDIA_SUFFIX[how],
                       "digest": _write_blob(layout, blob), "size": len(blob)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _write_blob(layout, config), "size": len(config)},
        "layers": layers}).encode()
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": _write_blob(layout, manifest), "size": len(manifest)}


def oci_layout(layout: Path, ref: str, top: dict):
    """Finish an OCI layout whose index.json names `top` (a manifest or index) as `ref`."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    desc = dict(top, annotations={"org.opencontainers.image.ref.name": ref})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


def index_of(layout: Path, entries: list[tuple[dict, dict]]) -> dict:
    """An OCI index of (manifest descriptor, platform) pairs, written into `layout`."""
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [dict(d, platform=p) for d, p in entries]}).encode()
    return {"mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": _write_blob(layout, index), "size": len(index)}


def store_snapshot(store: Path) -> dict:
    """Everything in a store (paths, types, sizes, file digests), to show a
    failed command changed nothing. The lock file's existence is all it keeps."""
    out = {}
    if not store.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(store):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(store))
            if p.is_symlink() or p.is_dir():
                out[rel] = "dir" if p.is_dir() else "link"
            elif rel == "lock":
                out[rel] = "lock"
            else:
                out[rel] = sha_file(p)
    return out


class FaultyProxy:
    """An http front for a plain registry that spoils the download of one
    blob: "drop" sends half of it and closes the connection; "stall" sends
    half and then waits (until stopped), setting `stalled`; or, in mode
    "503-once", answers the first blob upload (PUT) with 503 Service
    Unavailable. Everything else passes through unchanged (the Host header
    too, so the registry's upload Locations point at the proxy). `hits`
    counts the spoiled requests."""

    def __init__(self, upstream: Registry, digest: str, mode: str):
        import http.client
        self.digest, self.mode = digest, mode
        self.hits = 0
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self.port = free_port()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method):
                conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=30)
                headers = dict(self.headers.items())
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.mode == "503-once" and method == "PUT" and "/blobs/uploads/" in self.path \
                        and proxy.hits == 0:
                    proxy.hits += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn.request(method, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                spoil = method == "GET" and self.path.endswith(f"/blobs/{proxy.digest}") and r.status == 200
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not spoil:
                    if method != "HEAD":
                        self.wfile.write(data)
                    return
                proxy.hits += 1
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                if proxy.mode == "stall":
                    proxy.stalled.set()
                    proxy._stop.wait(60)
                self.close_connection = True

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

            def do_POST(self):
                self._forward("POST")

            def do_PUT(self):
                self._forward("PUT")

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
