"""Migrating a running container between machines through the real CLI: run
it in store A, change it with `exec`, `commit` it while it runs, `push` it
to a real registry (docker-registry, plain http on 127.0.0.1), `pull` it into
a fresh store B and run it there (issue 11's closing test). Real runc and
real unionfs mounts; everything is removed again (containers with rm -f, the
registry stopped by pid)."""

from __future__ import annotations

import json

import pytest

from container_helpers import Engine, runtime_missing_reason, write_test_image
from registry_helpers import REGISTRY_BIN, start_registry

pytestmark = [
    pytest.mark.skipif(runtime_missing_reason() is not None, reason=runtime_missing_reason() or ""),
    pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry is not installed"),
]

IMAGE = "busy:1"


@pytest.fixture
def registry(tmp_path):
    reg = start_registry("plain", tmp_path / "registry")
    yield reg
    reg.stop()


@pytest.fixture
def stores(tmp_path):
    """Store A (the busybox test image loaded) and an empty store B; every
    container in either is removed at the end, and nothing may be left."""
    a, b = Engine(tmp_path / "store-a"), Engine(tmp_path / "store-b")
    a("image", "load", "-q", write_test_image(tmp_path / "busy.tar", IMAGE))
    yield a, b
    assert a.close() == [] and b.close() == []


def image_id(engine: Engine, ref: str) -> str:
    return json.loads(engine("image", "inspect", ref).stdout)[0]["Id"]


def test_run_commit_push_pull_run_elsewhere(registry, stores):
    a, b = stores
    ref = f"{registry.host}/web:v2"
    a("run", "-d", "--name", "web", IMAGE, "sh", "-c", "echo v1 > /app/msg; exec sleep 600")
    a("exec", "web", "sh", "-c", "echo migrated from A > /app/msg; mkdir -p /srv && echo made > /srv/new")
    assert a("exec", "web", "cat", "/app/msg").stdout == "migrated from A\n"

    committed = a("commit", "web", ref).stdout.strip()
    assert a("ps").stdout.split("\n", 1)[1].split()[0] == "web"     # it ran on through the commit
    a("push", "--tls-verify=false", "-q", ref)
    a("rm", "-f", "web")

    pulled = b("pull", "--tls-verify=false", "-q", ref).stdout.strip()
    here = a("run", "--rm", ref, "sh", "-c", "cat /app/msg /srv/new")
    there = b("run", "--rm", ref, "sh", "-c", "cat /app/msg /srv/new")
    assert there.stdout == here.stdout == "migrated from A\nmade\n"
    # The image's own command, kept by commit, runs there as it ran here.
    assert b("run", "--rm", ref).stdout == "hello from /app\n"

    assert pulled == committed == image_id(a, ref) == image_id(b, ref)
    assert b.containers() == [] and a.containers() == []
