"""Interop with the real tools: images built by umoci and converted by skopeo
load and mount to exactly what `umoci unpack` gives; archives we save are
read back by skopeo and umoci to exactly the committed tree."""

import os
import shutil
import subprocess
import sys

import pytest

from image_helpers import force_unmount, fuse_available, have_mount_api, tree

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")
IS_ROOT = os.geteuid() == 0

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (UMOCI and SKOPEO), reason="needs umoci and skopeo (CI installs them)"),
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse"),
    pytest.mark.skipif(not have_mount_api(), reason="unionfs.mount is not there yet"),
]


def run(*cmd, cwd=None):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}: {p.stderr}"
    return p.stdout


def unionfs(*args):
    return run(sys.executable, "-m", "unionfs", *args)


def skopeo(*args):
    return run(SKOPEO, "--insecure-policy", "copy", "-q", *args)


def umoci_unpack(image, dest):
    run(UMOCI, "unpack", *([] if IS_ROOT else ["--rootless"]), "--image", image, dest)
    return dest / "rootfs"


def rootfs_tree(path):
    # umoci records its own bookkeeping in user.rootlesscontainers when rootless;
    # directory mtimes differ by design (a union mount changes them on copy-up).
    return tree(str(path), owners=IS_ROOT)


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory):
    """A three-layer image built with umoci: a base, a layer that changes and
    deletes files, one that replaces a directory."""
    tmp = tmp_path_factory.mktemp("umoci")
    layout = tmp / "layout"
    run(UMOCI, "init", "--layout", layout)
    run(UMOCI, "new", "--image", f"{layout}:t")
    rootless = [] if IS_ROOT else ["--rootless"]

    def layer(change):
        bundle = tmp / "bundle"
        if bundle.exists():
            shutil.rmtree(bundle)
        run(UMOCI, "unpack", *rootless, "--image", f"{layout}:t", bundle)
        change(bundle / "rootfs")
        run(UMOCI, "repack", "--image", f"{layout}:t", bundle)

    def base(r):
        for d in ("etc", "usr/bin", "srv/www/assets", "var/empty"):
            os.makedirs(r / d)
        (r / "etc/motd").write_text("hello\n")
        (r / "etc/hosts").write_text("127.0.0.1 localhost\n")
        (r / "usr/bin/tool").write_text("#!/bin/sh\n")
        os.chmod(r / "usr/bin/tool", 0o755)
        os.symlink("usr/bin", r / "bin")
        os.link(r / "etc/motd", r / "etc/motd.hard")
        os.mkfifo(r / "var/fifo", 0o640)
        (r / "srv/www/index.html").write_text("v1")
        (r / "srv/www/assets/logo").write_text("logo")
        os.setxattr(r / "etc/hosts", "user.origin", b"umoci")
        if IS_ROOT:
            os.chown(r / "var/empty", 1234, 5678)

    def change(r):
        (r / "etc/motd").write_text("changed\n")  # the hardlink sees it too
        os.unlink(r / "etc/hosts")
        (r / "etc/new").write_text("new")

    def replace(r):
        shutil.rmtree(r / "srv/www")
        os.mkdir(r / "srv/www")
        (r / "srv/www/index.html").write_text("v2")

    layer(base)
    layer(change)
    layer(replace)
    run(UMOCI, "config", "--image", f"{layout}:t", "--config.cmd", "/bin/sh", "--config.workingdir", "/srv")
    reference = umoci_unpack(f"{layout}:t", tmp / "reference")
    return layout, reference


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(store, image):
        mnt = tmp_path / f"mnt{len(made)}"
        mnt.mkdir()
        made.append(str(mnt))
        unionfs("image", "mount", "--store", store, "-q", image, mnt)
        return mnt
    try:
        yield mount
    finally:
        for m in reversed(made):
            force_unmount(m)


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive", "oci-dir"])
def test_umoci_image_via_skopeo_mounts_like_umoci_unpack(umoci_image, mounts, tmp_path, transport):
    layout, reference = umoci_image
    store = tmp_path / "store"
    if transport == "docker-archive":
        skopeo(f"oci:{layout}:t", f"docker-archive:{tmp_path}/img.tar:interop/img:t")
        unionfs("image", "load", "--store", store, "-q", tmp_path / "img.tar")
        name = "interop/img:t"
    elif transport == "oci-archive":
        skopeo(f"oci:{layout}:t", f"oci-archive:{tmp_path}/img.tar:interop")
        unionfs("image", "load", "--store", store, "-q", tmp_path / "img.tar")
        name = "interop"
    else:
        unionfs("image", "load", "--store", store, "-q", layout)
        name = "t"
    mnt = mounts(store, name)
    assert rootfs_tree(mnt) == rootfs_tree(reference)
    assert not (mnt / "etc/hosts").exists() and not (mnt / "srv/www/assets").exists()
    import json
    info = json.loads(unionfs("image", "inspect", "--store", store, name))[0]
    assert info["Config"]["Cmd"] == ["/bin/sh"] and info["Config"]["WorkingDir"] == "/srv"


def test_saved_archives_read_back_by_skopeo_and_umoci(umoci_image, mounts, tmp_path):
    layout, _ = umoci_image
    store = tmp_path / "store"
    unionfs("image", "load", "--store", store, "-q", layout)
    mnt = mounts(store, "t")
    (mnt / "etc/motd").write_text("committed\n")
    os.unlink(mnt / "usr/bin/tool")
    shutil.rmtree(mnt / "srv")
    os.mkdir(mnt / "srv")
    (mnt / "srv/fresh").write_text("fresh")
    os.setxattr(mnt / "srv/fresh", "user.kind", b"fresh")
    unionfs("commit", "--store", store, "-q", mnt, "ours:1", "-m", "interop change")
    committed = rootfs_tree(mnt)
    unionfs("umount", mnt)

    unionfs("image", "save", "--store", store, "ours:1", "-o", tmp_path / "d.tar", "--format", "docker")
    unionfs("image", "save", "--store", store, "ours:1", "-o", tmp_path / "o.tar", "--format", "oci")
    # skopeo reads both archive kinds; umoci unpacks what skopeo wrote.
    skopeo(f"docker-archive:{tmp_path}/d.tar", f"oci:{tmp_path}/from-docker:x")
    skopeo(f"oci-archive:{tmp_path}/o.tar:ours:1", f"oci:{tmp_path}/from-oci:x")
    assert rootfs_tree(umoci_unpack(f"{tmp_path}/from-docker:x", tmp_path / "b1")) == committed
    assert rootfs_tree(umoci_unpack(f"{tmp_path}/from-oci:x", tmp_path / "b2")) == committed
    # umoci reads our OCI layout directly, once extracted.
    (tmp_path / "extracted").mkdir()
    run("tar", "-xf", tmp_path / "o.tar", "-C", tmp_path / "extracted")
    assert rootfs_tree(umoci_unpack(f"{tmp_path}/extracted:ours:1", tmp_path / "b3")) == committed
