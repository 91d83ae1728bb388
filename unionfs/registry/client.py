"""One registry's v2 API over HTTP(S), through httpx.

httpx because one `httpx.Client` is safe to share between the threads that
move layers in parallel, streams request and response bodies (a layer is
never held in memory), takes an `ssl.SSLContext` (system CAs plus the
registry's certs.d directory), and drops `Authorization` on a redirect to
another host (blob downloads are often redirected to object storage).

Every request names the scopes it needs; auth (auth.py) turns them into an
`Authorization` header after the registry's first 401. Transient failures
(connection reset, timeouts, 429, 5xx) are retried a few times; anything a
user can cause ends as one UserError line naming the registry.
"""

from __future__ import annotations

import glob
import os
import ssl
import time
from urllib.parse import urljoin

import httpx

from unionfs import __version__
from unionfs.errors import UserError
from unionfs.registry import auth

CERTS_D = "/etc/containers/certs.d"
DOCKER_CERTS_D = "/etc/docker/certs.d"
USER_AGENT = f"unionfs/{__version__}"
ATTEMPTS = 4                  # tries of one request facing transient failures
BACKOFF = 0.5                 # seconds before the second try, doubled after
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
TIMEOUT = httpx.Timeout(60.0, connect=15.0)
MAX_CONNECTIONS = 8


class Transient(UserError):
    """A failure that trying again may cure (a dropped connection, 5xx);
    its message is the one the user sees when the tries run out."""


def registry_cert_dirs(registry: str, cert_dir: str | None) -> list[str]:
    """Where the registry's CA (*.crt) and client cert (*.cert + *.key) are:
    `--cert-dir`, else /etc/containers/certs.d/HOST[:PORT] and docker's."""
    if cert_dir is not None:
        return [cert_dir]
    return [os.path.join(CERTS_D, registry), os.path.join(DOCKER_CERTS_D, registry)]


def ssl_context(registry: str, cert_dir: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for d in registry_cert_dirs(registry, cert_dir):
        try:
            for ca in sorted(glob.glob(os.path.join(glob.escape(d), "*.crt"))):
                ctx.load_verify_locations(cafile=ca)
            for cert in sorted(glob.glob(os.path.join(glob.escape(d), "*.cert"))):
                ctx.load_cert_chain(cert, cert[:-len(".cert")] + ".key")
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"registry {registry}: certificates in {d}: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def _error_detail(r: httpx.Response) -> str:
    """The registry's own words for a failed request (errors[0] of its JSON)."""
    try:
        errors = r.json().get("errors")
        e = errors[0]
        code, message = e.get("code", ""), e.get("message", "")
        return f"{code.lower().replace('_', ' ')}: {message}" if code else message
    except Exception:        # any body that is not the spec's error JSON
        return r.reason_phrase or f"HTTP {r.status_code}"


def _titled(word: str, detail: str) -> str:
    """`detail`, led by `word` unless the registry's words already are."""
    if detail.lower().startswith(word):          # "Unauthorized", "unauthorized: ..."
        return word + detail[len(word):]
    return f"{word}: {detail}"


class Client:
    """The v2 API of one registry (`host[:port]`), for one command."""

    def __init__(self, registry: str, api_host: str | None = None, tls_verify: bool = True,
                 cert_dir: str | None = None, creds: auth.Credentials | None = None):
        """`creds` default to those stored for `registry` (login gives new ones)."""
        self.registry = registry
        self.host = api_host or registry
        self.tls_verify = tls_verify
        if creds is None:
            creds = auth.lookup(registry)
        self.auth = auth.Authenticator(registry, creds, self._fetch_token)
        verify = ssl_context(registry, cert_dir) if tls_verify else False
        self.http = httpx.Client(verify=verify, timeout=TIMEOUT, follow_redirects=True,
                                 headers={"User-Agent": USER_AGENT},
                                 limits=httpx.Limits(max_connections=MAX_CONNECTIONS))
        self.base = f"https://{self.host}"

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- connection ------------------------------------------------------------

    def ping(self):
        """GET /v2/ without credentials: find the scheme (https; plain http
        only without TLS verification) and learn how the registry
        authenticates (its 401 challenge)."""
        try:
            r = self._get_v2()
        except UserError:
            if self.tls_verify:
                raise
            self.base = f"http://{self.host}"
            r = self._get_v2()
        if r.status_code == 401:
            self.auth.challenge(r.headers.get("WWW-Authenticate"), (), None)
        elif r.status_code != 200:
            raise UserError(self._status_message(r, f"registry {self.registry}"))

    def _get_v2(self) -> httpx.Response:
        try:
            return self.http.get(self._url("/v2/"))
        except httpx.ConnectError as e:
            raise UserError(self._connect_message(e)) from None
        except httpx.HTTPError as e:
            raise UserError(f"registry {self.registry}: {type(e).__name__}: {e or 'no response'}") from None

    def _url(self, path: str) -> str:
        return urljoin(self.base + "/", path) if not path.startswith(("http://", "https://")) else path

    def _send(self, method, path, scopes, headers=None, body=None, stream=False):
        """One request, asking again once after a 401 the authenticator can
        answer. `body` is a callable returning fresh content (bytes or an
        iterator), so a request can be sent twice."""
        for attempt in range(2):
            h = dict(headers or {})
            sent = self.auth.header(scopes)
            if sent:
                h["Authorization"] = sent
            req = self.http.build_request(method, self._url(path), headers=h,
                                          content=body() if body else None)
            try:
                r = self.http.send(req, stream=stream)
            except httpx.ConnectError as e:
                raise UserError(self._connect_message(e)) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                raise Transient(f"registry {self.registry}: {type(e).__name__}: {e or 'no response'}") from None
            if attempt == 0 and r.status_code == 401 and \
                    self.auth.challenge(r.headers.get("WWW-Authenticate"), scopes, sent):
                r.close()
                continue
            return r
        raise AssertionError("unreachable")

    def _connect_message(self, e: httpx.ConnectError) -> str:
        text = str(e)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip()
            return (f"registry {self.registry}: TLS certificate not trusted ({reason}); put its CA in "
                    f"{os.path.join(CERTS_D, self.registry)}/ca.crt (or --cert-dir DIR), "
                    f"or use --tls-verify=false")
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return (f"registry {self.registry}: does not speak https "
                    f"(a plain http registry needs --tls-verify=false)")
        if "Name or service not known" in text or "Temporary failure in name resolution" in text \
                or "No address associated" in text:
            return f"registry {self.registry}: unknown host"
        if "Connection refused" in text:
            return f"registry {self.registry}: connection refused"
        return f"registry {self.registry}: cannot connect: {text or type(e).__name__}"

    # -- requests --------------------------------------------------------------

    def request(self, method: str, path: str, scopes: tuple[str, ...], *, what: str,
                ok=(200,), headers=None, body=None, stream=False, missing_ok=False,
                attempts: int = ATTEMPTS) -> httpx.Response:
        """Send, trying up to `attempts` times facing transient failures;
        return the response if its status is in `ok` (or 404 with
        `missing_ok`), else raise one UserError about `what` (a Transient
        one if the last failure was transient)."""
        delay = BACKOFF
        for attempt in range(attempts):
            try:
                r = self._send(method, path, scopes, headers, body, stream)
                if r.status_code in TRANSIENT_STATUS:
                    if stream:
                        r.read()
                    raise Transient(self._status_message(r, what))
            except Transient as e:
                if attempt + 1 == attempts:
                    raise Transient(str(e) if str(e).startswith(what) else f"{what}: {e}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if r.status_code in ok or (missing_ok and r.status_code == 404):
                return r
            if stream:
                r.read()
            raise UserError(self._status_message(r, what))
        raise AssertionError("unreachable")

    def _status_message(self, r: httpx.Response, what: str) -> str:
        detail = _error_detail(r)
        if r.status_code == 401:
            hint = (" (wrong username or password?)" if self.auth.creds
                    else f" (log in with: unionfs login {self.registry})")
            return f"{what}: {self.registry}: {_titled('unauthorized', detail)}{hint}"
        if r.status_code == 403:
            return f"{what}: {self.registry}: {_titled('denied', detail)}"
        if r.status_code == 404:
            return f"{what}: not found: {detail}"
        return f"{what}: {self.registry} answered HTTP {r.status_code}: {detail}"

    def check_login(self):
        """Succeed if the registry takes our credentials (what `login` checks):
        a token for no scope from a token server, or /v2/ with Basic auth."""
        self.ping()
        what = f"login {self.registry}"
        if not self.auth.challenged:
            return               # a registry without auth takes anyone
        r = self.request("GET", "/v2/", (), what=what, ok=(200, 401))
        if r.status_code == 401:
            raise UserError(f"{what}: wrong username or password")

    # -- tokens ----------------------------------------------------------------

    def _fetch_token(self, ch: auth.Challenge, scopes: tuple[str, ...], creds) -> tuple[str, float]:
        realm = ch.params.get("realm")
        if not realm:
            raise UserError(f"registry {self.registry}: bearer challenge without a realm")
        params = [("scope", s) for s in scopes]
        if ch.params.get("service"):
            params.insert(0, ("service", ch.params["service"]))
        headers = {"Authorization": creds.basic_header()} if creds else {}
        what = f"registry {self.registry}: token from {realm}"
        try:
            r = self.http.get(realm, params=params, headers=headers)
        except httpx.ConnectError as e:
            raise UserError(f"{what}: {self._connect_message(e).split(': ', 1)[1]}") from None
        except httpx.HTTPError as e:
            raise UserError(f"{what}: {type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            if creds:
                raise UserError(f"registry {self.registry}: wrong username or password "
                                f"(the token server {realm} said: {_error_detail(r)})")
            raise UserError(f"{what}: {_error_detail(r)} (log in with: unionfs login {self.registry})")
        if r.status_code != 200:
            raise UserError(f"{what}: HTTP {r.status_code}: {_error_detail(r)}")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or auth.DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UserError(f"{what}: the answer has no token")
        return token, lifetime
