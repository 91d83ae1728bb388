"""A real Debian rootfs as an image (slow: debootstrap fetches ~40 MB from
Debian's mirror): load it, mount it with `image mount`, and install a local
.deb with apt-get in a chroot with /proc mounted and nothing bound over
/dev, as a user does. Its maintainer script writes to the image's own
/dev/null, which must work (issue 14)."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from image_helpers import docker_archive, force_unmount, fuse_available, tiny_deb

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fuse,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, chroot and device nodes need root"),
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse"),
    pytest.mark.skipif(not shutil.which("debootstrap"), reason="debootstrap is not installed"),
]

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"

# Run in a private mount namespace: /proc in the rootfs goes away with it.
CHROOT_SCRIPT = """
set -e
mount -t proc proc "$1/proc"
chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y /tmp/tiny.deb
chroot "$1" dpkg-query -W -f '${Status}\\n' tiny
"""


def unionfs(*args):
    p = subprocess.run([sys.executable, "-m", "unionfs", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"unionfs {' '.join(map(str, args))}: {p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def debian_layer(tmp_path_factory):
    """A minbase Debian rootfs as one layer tar."""
    base = tmp_path_factory.mktemp("debian")
    rootfs = base / "rootfs"
    p = subprocess.run(["debootstrap", "--variant=minbase", SUITE, rootfs, MIRROR],
                       capture_output=True, text=True, timeout=1500)
    if p.returncode != 0 and "Failed getting release file" in p.stdout + p.stderr:
        pytest.skip(f"Debian's mirror {MIRROR} is not reachable")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    layer = base / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(os.listdir(rootfs)):
            tf.add(rootfs / entry, arcname=entry)
    yield layer.read_bytes()
    shutil.rmtree(base, ignore_errors=True)


def test_apt_get_installs_a_local_deb_in_a_mounted_debian_image(debian_layer, tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    docker_archive(tmp_path / "debian.tar", [debian_layer], tags=[f"debian:{SUITE}"])
    unionfs("image", "load", "--store", store, "-q", tmp_path / "debian.tar")
    name = unionfs("image", "mount", "--store", store, f"debian:{SUITE}", mnt, "--name", "deb").strip()
    try:
        shutil.copy(tiny_deb(tmp_path), mnt / "tmp" / "tiny.deb")
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT_SCRIPT,
                            "sh", mnt], capture_output=True, text=True, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out
        assert "/dev/null" not in out
        assert p.stdout.rstrip().endswith("install ok installed")   # dpkg-query, last
        assert (mnt / "var/lib/tiny-configured").read_text() == "ok\n"
        diff = unionfs("diff", "--store", store, name).splitlines()
        assert "A /var/lib/tiny-configured" in diff and "A /usr/share/tiny/README" in diff
    finally:
        force_unmount(str(mnt))
