"""The demo image builder: deterministic, offline, and the layers do what
demo/README.md says (checked on the store's layers with the union's lookup)."""

import os
import subprocess
import sys

import pytest

from image_helpers import run_cli
from unionfs.image.changes import LowerView
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
    assert len(image.layers) == 4
    view = LowerView(store.lowerdirs(image))
    assert view.exists(("bin", "busybox")) and view.exists(("bin", "sh"))
    assert not view.exists(("app", "config.ini"))                      # deleted by a whiteout
    assert view.listdir(("app", "data")) == {"new.txt"}                 # replaced: opaque
    assert view.listdir(("app",)) == {"README", "VERSION", "data"}
    top = store.layer_root(image.layers[-1].diff_id)
    assert os.path.exists(os.path.join(top, "app/data/.wh..wh..opq"))


def test_name_candidates():
    assert name_candidates("busybox") == ["busybox", "busybox:latest", "docker.io/library/busybox",
                                          "docker.io/library/busybox:latest"]
    assert name_candidates("me/app:1") == ["me/app:1", "docker.io/me/app:1"]
    assert name_candidates("docker.io/library/busybox:1") == ["docker.io/library/busybox:1", "busybox:1"]
    assert name_candidates("quay.io/x/y:2") == ["quay.io/x/y:2"]
    assert name_candidates("localhost:5000/x") == ["localhost:5000/x", "localhost:5000/x:latest"]
