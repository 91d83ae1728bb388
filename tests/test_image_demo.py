"""The demo image builder: deterministic, offline, and the layers do what
demo/README.md says (checked by applying the archive's layers with plain tarfile)."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest

from image_helpers import apply_layers, run_cli
from unionfs.image.store import Store, name_candidates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "make_demo_image.py")
BUSYBOX = next((b for b in ("/bin/busybox", "/usr/bin/busybox") if os.path.isfile(b)), None)


@pytest.mark.skipif(BUSYBOX is None, reason="needs busybox-static")
def test_demo_image_is_deterministic_and_layered(tmp_path):
    for name in ("a.tar", "b.tar"):
        subprocess.run([sys.executable, SCRIPT, "-o", tmp_path / name], check=True, capture_output=True)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    store = Store(tmp_path / "store")
    rc, out, err = run_cli("image", "load", "--store", store.root, tmp_path / "a.tar")
    assert (rc, out) == (0, "Loaded image: unionfs-demo:latest\n"), err
    image = store.resolve("unionfs-demo")
    tars = archive_layers(tmp_path / "a.tar")
    assert [l.diff_id for l in image.layers] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    # The layers applied in order by plain tarfile (not the union's lookup).
    ref = tmp_path / "applied"
    ref.mkdir()
    apply_layers(tars, str(ref))
    assert (ref / "bin/busybox").is_file() and os.path.lexists(ref / "bin/sh")
    assert not os.path.lexists(ref / "app/config.ini")                # deleted by a whiteout
    assert sorted(os.listdir(ref / "app/data")) == ["new.txt"]          # replaced: opaque
    assert sorted(os.listdir(ref / "app")) == ["README", "VERSION", "data"]
    top = store.layer_root(image.layers[-1].diff_id)
    assert os.path.exists(os.path.join(top, "app/data/.wh..wh..opq"))


def archive_layers(path) -> list[bytes]:
    """The layer tars of a classic docker-archive, oldest first."""
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert len(manifest) == 1
        return [tf.extractfile(name).read() for name in manifest[0]["Layers"]]


def test_name_candidates():
    assert name_candidates("busybox") == ["busybox", "busybox:latest", "docker.io/library/busybox",
                                          "docker.io/library/busybox:latest"]
    assert name_candidates("me/app:1") == ["me/app:1", "docker.io/me/app:1"]
    assert name_candidates("docker.io/library/busybox:1") == ["docker.io/library/busybox:1", "busybox:1"]
    assert name_candidates("quay.io/x/y:2") == ["quay.io/x/y:2"]
    assert name_candidates("localhost:5000/x") == ["localhost:5000/x", "localhost:5000/x:latest"]
