"""The same image run by podman and by `unionfs run` gives the process the
same environment, working directory and ids (podman on kernel overlayfs,
in the throw-away set-up of podman_helpers.py)."""

from __future__ import annotations

import shutil

import pytest

from container_helpers import Engine, runtime_missing_reason, write_test_image
from podman_helpers import PodmanSandbox

pytestmark = [
    pytest.mark.skipif(runtime_missing_reason() is not None, reason=runtime_missing_reason() or ""),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

# What the process sees of itself; the kernel sorts the supplementary groups.
PROBE = "env | sort; echo cwd=$(pwd); echo ids=$(id -u):$(id -g); grep ^Groups: /proc/self/status"
# Set by one engine and not the other (podman always sets TERM and
# container=podman); the host name is each engine's choice.
ENGINE_OWN = ("HOSTNAME=", "TERM=", "container=")


def _view(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if not line.startswith(ENGINE_OWN)]


def test_same_environment_cwd_and_ids_as_podman(tmp_path):
    archive = write_test_image(tmp_path / "busy.tar", "busy:1")
    engine = Engine(tmp_path / "store")
    podman = PodmanSandbox(None)
    try:
        engine("image", "load", "-q", archive)
        podman.run("load", "-i", str(archive))
        for extra in ([], ["-u", "alice"], ["-u", "bob:staff"], ["-w", "/tmp", "-e", "GREETING=x"]):
            ours = engine("run", "--rm", *extra, "busy:1", "sh", "-c", PROBE).stdout
            theirs = podman.run("run", "--rm", *extra, "busy:1", "sh", "-c", PROBE).stdout
            assert _view(ours) == _view(theirs), extra
            assert "ids=" in ours
    finally:
        complaints = podman.close()
        assert engine.close() == []
    assert complaints == []
