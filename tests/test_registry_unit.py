"""Pure logic of the registry client: references, challenges, tokens,
the auth file, platforms. No network."""

import base64
import json
import os
import stat

import pytest

from unionfs.errors import UserError
from unionfs.registry import auth, reference
from unionfs.registry.pull import Platform, choose, parse_platform
from unionfs.registry.manifest import Descriptor, Index


@pytest.mark.parametrize("text, want", [
    ("busybox", ("docker.io", "library/busybox", "latest", None)),
    ("docker.io/busybox:1.36", ("docker.io", "library/busybox", "1.36", None)),
    ("quay.io/org/app", ("quay.io", "org/app", "latest", None)),
    ("localhost:5000/a/b:v1", ("localhost:5000", "a/b", "v1", None)),
    ("127.0.0.1:5000/app@sha256:" + "a" * 64, ("127.0.0.1:5000", "app", None, "sha256:" + "a" * 64)),
    ("user/app:dev", ("docker.io", "user/app", "dev", None)),
])
def test_references(text, want):
    r = reference.parse(text)
    assert (r.registry, r.repo, r.tag, r.digest) == want


@pytest.mark.parametrize("text", ["UPPER/case", "host:5000/x:bad tag", "x@sha256:12", "a//b", ""])
def test_bad_references_are_refused(text):
    with pytest.raises(UserError):
        reference.parse(text)


def test_push_needs_a_registry_in_the_name():
    with pytest.raises(UserError, match="name the registry"):
        reference.parse("app:1", need_registry=True)


def test_registry_hosts_as_login_takes_them():
    assert reference.registry_host("https://index.docker.io/v1/") == "docker.io"
    assert reference.registry_host("127.0.0.1:5000") == "127.0.0.1:5000"
    with pytest.raises(UserError):
        reference.registry_host("a b")


def test_challenges():
    ch = auth.parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                              'scope="repository:a/b:pull,push"')
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "registry.example",
                         "scope": "repository:a/b:pull,push"}
    assert auth.parse_challenge('Basic realm="x \\"y\\""').params == {"realm": 'x "y"'}
    assert auth.parse_challenge(None) is None


def test_tokens_are_reused_until_they_expire_and_asked_again_after_a_401(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    asked = []

    def fetch(ch, scopes, creds):
        asked.append(scopes)
        return f"token{len(asked)}", 60

    a = auth.Authenticator("r.example", auth.Credentials("u", "p"), fetch)
    scopes = ("repository:a:pull",)
    assert a.header(scopes) is None                      # no challenge seen yet
    assert a.challenge('Bearer realm="https://t/token",service="s"', scopes, None)
    assert a.header(scopes) == "Bearer token1"
    clock[0] += 40
    assert a.header(scopes) == "Bearer token1"           # reused
    clock[0] += 15                                       # within the slack before expiry
    assert a.header(scopes) == "Bearer token2"
    assert a.challenge('Bearer realm="https://t/token",service="s"', scopes, "Bearer token2")
    assert a.header(scopes) == "Bearer token3"           # a 401 drops the token
    assert a.header(("repository:b:pull",)) == "Bearer token4"   # other scopes, other token
    assert asked == [scopes] * 3 + [("repository:b:pull",)]


def test_basic_challenge_sends_credentials_only_when_there_are_some():
    a = auth.Authenticator("r", None, None)
    assert not a.challenge('Basic realm="r"', (), None)
    b = auth.Authenticator("r", auth.Credentials("u", "p"), None)
    assert b.challenge('Basic realm="r"', (), None)
    assert b.header(()) == "Basic " + base64.b64encode(b"u:p").decode()
    assert not b.challenge('Basic realm="r"', (), b.header(()))    # refused credentials: stop
    assert "p" not in repr(b.creds).replace("Credentials", "")


def test_auth_file_round_trip_and_docker_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(auth.ENV_AUTH_FILE, str(tmp_path / "sub" / "auth.json"))
    assert auth.lookup("r.example:5000") is None
    path = auth.store("r.example:5000", auth.Credentials("me", "pa:ss"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(open(path).read()) == {"auths": {"r.example:5000": {"auth": base64.b64encode(b"me:pa:ss").decode()}}}
    assert auth.lookup("r.example:5000") == auth.Credentials("me", "pa:ss")
    assert auth.remove("r.example:5000") and not auth.remove("r.example:5000")
    os.makedirs(tmp_path / ".docker")
    (tmp_path / ".docker/config.json").write_text(json.dumps(
        {"auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()}}}))
    assert auth.lookup("docker.io") == auth.Credentials("hub", "pw")
    (tmp_path / "sub" / "auth.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read it"):
        auth.lookup("docker.io")


def _index(*platforms):
    return Index([Descriptor("m", "sha256:" + f"{i}" * 64, 1, platform=p) for i, p in enumerate(platforms)])


def test_platform_choice():
    idx = _index({"os": "linux", "architecture": "amd64"},
                 {"os": "linux", "architecture": "arm64", "variant": "v8"},
                 {"os": "linux", "architecture": "arm", "variant": "v7"})
    assert choose(idx, Platform("linux", "amd64"), False, "x").digest == idx.manifests[0].digest
    assert choose(idx, Platform("linux", "arm64", "v8"), False, "x").digest == idx.manifests[1].digest
    assert choose(idx, parse_platform("linux/arm/v7"), True, "x").digest == idx.manifests[2].digest
    with pytest.raises(UserError, match="no image for linux/arm/v6.*linux/amd64, linux/arm/v7, linux/arm64/v8"):
        choose(idx, parse_platform("linux/arm/v6"), True, "x")
    # The host's variant is a preference: an arm64 image without one still runs.
    plain = _index({"os": "linux", "architecture": "arm64"})
    assert choose(plain, Platform("linux", "arm64", "v8"), False, "x") is plain.manifests[0]
    with pytest.raises(UserError):
        parse_platform("linux")
