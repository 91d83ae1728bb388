"""Images on real mounts, through the `unionfs` command line: mount an image
as a container rootfs, change it, diff, commit, save, load again, remount."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from image_helpers import (CHR, D, F, FIFO, H, L, apply_layers, docker_archive, force_unmount, fuse_available,
                           have_mount_api, layer_tar, oci_layout, tiny_deb, tree)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse"),
    pytest.mark.skipif(not have_mount_api(), reason="unionfs.mount is not there yet"),
]

IS_ROOT = os.geteuid() == 0

BASE = layer_tar(
    D("bin"), F("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755), L("bin/alias", "tool"),
    D("etc", mode=0o755), F("etc/motd", b"hello\n"), F("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
    F("etc/secret", b"s", mode=0o600, uid=1000, gid=1000, xattrs={"user.label": "base"}),
    D("data"), F("data/a", b"a"), H("data/a-link", "data/a"), D("data/old"), F("data/old/x", b"x"),
    FIFO("run.fifo"),
    D("srv"), F("srv/index.html", b"<p>v1</p>"), D("srv/assets"), F("srv/assets/logo", b"logo1"),
)
CHANGE = layer_tar(D("etc"), F("etc/motd", b"hello again\n"), F("etc/added", b"added"))
DELETE = layer_tar(D("etc"), F("etc/.wh.passwd"), D("data"), F("data/.wh.old"))
REPLACE = layer_tar(D("srv"), F("srv/.wh..wh..opq"), F("srv/index.html", b"<p>v2</p>"), D("srv/new"),
                    F("srv/new/page", b"page"))
LAYERS = [BASE, CHANGE, DELETE, REPLACE]


def unionfs(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "unionfs", *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    if check:
        assert p.returncode == 0, f"unionfs {' '.join(map(str, args))}: {p.stderr}"
    return p


@pytest.fixture
def env(tmp_path):
    """A store with the test image loaded, and a mount helper that always
    unmounts what it mounted."""
    mounts = []
    store = tmp_path / "store"
    docker_archive(tmp_path / "image.tar", LAYERS, tags=["test/img:1"])
    unionfs("image", "load", "--store", store, "-q", tmp_path / "image.tar")

    def mount(image, name=None, store=store, options=None):
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        mounts.append(str(mnt))
        extra = ["--name", name] if name else []
        extra += ["-o", options] if options else []
        out = unionfs("image", "mount", "--store", store, image, mnt, *extra).stdout.strip()
        return mnt, out
    try:
        yield store, mount
    finally:
        for m in reversed(mounts):
            force_unmount(m)


def expected_tree(tmp_path, layers):
    ref = tmp_path / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir()
    apply_layers(layers, str(ref))
    return tree(str(ref), owners=IS_ROOT)


def test_mounted_image_equals_the_layers_applied_in_order(env, tmp_path):
    store, mount = env
    mnt, name = mount("test/img:1")
    assert name == "img-1"
    got = tree(str(mnt), owners=IS_ROOT)
    assert got == expected_tree(tmp_path, LAYERS)
    assert "etc/passwd" not in got and "data/old" not in got and "srv/assets" not in got
    assert os.getxattr(mnt / "etc/secret", "user.label") == b"base"
    assert os.lstat(mnt / "data/a").st_ino == os.lstat(mnt / "data/a-link").st_ino


def change_things(mnt):
    (mnt / "etc/motd").write_text("changed in the container\n")
    (mnt / "etc/brand-new").write_text("new\n")
    os.unlink(mnt / "etc/added")
    os.chmod(mnt / "bin/tool", 0o700)
    shutil.rmtree(mnt / "srv")
    os.mkdir(mnt / "srv")
    (mnt / "srv/only").write_text("only")
    os.symlink("../etc/motd", mnt / "data/motd-link")
    os.link(mnt / "etc/brand-new", mnt / "data/hard")
    os.setxattr(mnt / "etc/brand-new", "user.color", b"blue")


def test_change_diff_commit_save_load_remount(env, tmp_path):
    store, mount = env
    mnt, name = mount("test/img:1", name="work")
    change_things(mnt)
    diff = unionfs("diff", "--store", store, "work").stdout.splitlines()
    assert diff == sorted(diff, key=lambda l: l.split(" ", 1)[1])
    expected = {"C /bin", "C /bin/tool", "C /data", "A /data/hard", "A /data/motd-link", "C /etc",
                "D /etc/added", "A /etc/brand-new", "C /etc/motd", "C /srv", "D /srv/index.html",
                "D /srv/new", "A /srv/only"}
    assert set(diff) == expected
    # By mount point too.
    assert unionfs("diff", "--store", store, mnt).stdout.splitlines() == diff
    changed = tree(str(mnt), owners=IS_ROOT)
    # The same changes on the layers applied to a plain directory: what the
    # mount shows (mtimes aside: the two were changed moments apart).
    reference = tmp_path / "reference"
    reference.mkdir()
    apply_layers(LAYERS, str(reference))
    change_things(reference)
    assert tree(str(mnt), owners=IS_ROOT, mtimes=False) == tree(str(reference), owners=IS_ROOT, mtimes=False)

    unionfs("commit", "--store", store, mnt, "test/img:2", "-m", "container changes")
    unionfs("umount", mnt)
    # Committed again, unmounted: the same image.
    assert unionfs("commit", "--store", store, "-q", "work", "again", "-m", "container changes").stdout == ""
    ids = {unionfs("image", "inspect", "--store", store, ref).stdout.split('"Id": "')[1][:71]
           for ref in ("test/img:2", "again")}
    assert len(ids) == 1

    # The committed image mounted in a fresh container shows the changed tree.
    mnt2, _ = mount("test/img:2")
    assert tree(str(mnt2), owners=IS_ROOT) == changed
    unionfs("umount", mnt2)

    # Save in both formats, load into a new store, mount, same tree.
    for fmt in ("docker", "oci"):
        archive = tmp_path / f"img2-{fmt}.tar"
        unionfs("image", "save", "--store", store, "test/img:2", "-o", archive, "--format", fmt)
        other = tmp_path / f"store-{fmt}"
        unionfs("image", "load", "--store", other, archive)
        mnt3, _ = mount("test/img:2", store=other)
        assert tree(str(mnt3), owners=IS_ROOT) == changed
        unionfs("umount", mnt3)

    # The container keeps its changes: a second mount shows them again.
    mnt4, name4 = mount("test/img:1", name="work")
    assert name4 == "work"
    assert tree(str(mnt4), owners=IS_ROOT) == changed
    ps = unionfs("ps", "--store", store).stdout
    assert any(l.split()[:1] == ["work"] and l.split()[-1] == "Mounted" for l in ps.splitlines())
    # A mounted container cannot be removed without -f.
    p = unionfs("rm", "--store", store, "work", check=False)
    assert p.returncode == 1 and "is mounted at" in p.stderr
    unionfs("umount", mnt4)
    unionfs("rm", "--store", store, "work")
    assert "work" not in unionfs("ps", "-a", "--store", store).stdout


def test_mount_errors(env, tmp_path):
    store, mount = env
    p = unionfs("image", "mount", "--store", store, "nope", tmp_path, check=False)
    assert p.returncode == 1 and p.stderr == "unionfs: image nope: no such image\n"
    mnt, _ = mount("test/img:1", name="busy")
    other = tmp_path / "other"
    other.mkdir()
    p = unionfs("image", "mount", "--store", store, "test/img:1", other, "--name", "busy", check=False)
    assert p.returncode == 1 and "already mounted" in p.stderr
    assert not os.path.ismount(other)


def test_device_whiteouts_in_upper_are_committed_as_wh_files(env, tmp_path):
    """Deleting through the mount writes whatever whiteout format the mount
    chose; the committed layer always has .wh. entries."""
    store, mount = env
    mnt, _ = mount("test/img:1", name="wh")
    os.unlink(mnt / "etc/motd")
    shutil.rmtree(mnt / "data")
    unionfs("commit", "--store", store, "wh", "wh:1")
    unionfs("umount", mnt)
    archive = tmp_path / "wh.tar"
    unionfs("image", "save", "--store", store, "wh:1", "-o", archive)
    with tarfile.open(archive) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        top = tarfile.open(fileobj=io.BytesIO(tf.extractfile(manifest[0]["Layers"][-1]).read()))
    assert "etc/.wh.motd" in top.getnames() and ".wh.data" in top.getnames()
    assert not any(m.ischr() for m in top.getmembers())


def mount_flags(mnt) -> set[str]:
    """The per-mount flags /proc/self/mountinfo shows for ``mnt``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


DEVICES = layer_tar(D("dev"), CHR("dev/null", 1, 3, mode=0o666), D("bin"),
                    F("bin/run", b"#!/bin/sh\necho ran\n", mode=0o755))


@pytest.mark.skipif(not IS_ROOT, reason="device nodes in a layer need root")
def test_image_rootfs_allows_its_devices_and_set_id_files_unless_told(env, tmp_path):
    """The image's own /dev/null opens and takes writes in its rootfs (apt's
    and dpkg's scripts need it); `-o nodev,nosuid,noexec,ro` turns each off."""
    store, mount = env
    docker_archive(tmp_path / "dev.tar", [DEVICES], tags=["test/dev:1"])
    unionfs("image", "load", "--store", store, "-q", tmp_path / "dev.tar")
    mnt, _ = mount("test/dev:1")
    with open(mnt / "dev/null", "w") as f:
        f.write("discarded\n")
    assert (mnt / "dev/null").read_text() == ""
    assert not {"nodev", "nosuid", "noexec", "ro"} & mount_flags(mnt)
    assert subprocess.run([mnt / "bin/run"], capture_output=True, text=True).stdout == "ran\n"

    locked, _ = mount("test/dev:1", options="nodev,nosuid,noexec,ro")
    assert {"nodev", "nosuid", "noexec", "ro"} <= mount_flags(locked)
    with pytest.raises(PermissionError):
        open(locked / "dev/null", "w")
    with pytest.raises(PermissionError):
        subprocess.run([locked / "bin/run"])
    with pytest.raises(OSError) as e:
        (locked / "new").write_text("x")
    assert e.value.errno == errno.EROFS


def test_image_mount_refuses_unknown_options(env, tmp_path):
    store, _ = env
    p = unionfs("image", "mount", "--store", store, "-o", "nodev,lowerdir=/", "test/img:1", tmp_path,
                check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("unionfs: image mount: unknown option 'lowerdir=/'") and p.stderr.count("\n") == 1
    assert "img-1" not in unionfs("ps", "--store", store).stdout


@pytest.mark.parametrize("target, reason", [("missing", "no such directory"), ("file", "not a directory")])
def test_every_mount_command_refuses_a_missing_mount_point_alike(env, tmp_path, target, reason):
    """`image mount`, `unionfs mount` and `fuse-unionfs` neither create a
    missing mount point nor call it something else: one line, the same words,
    and no container left behind."""
    store, _ = env
    (tmp_path / "file").write_text("x")
    (tmp_path / "lower").mkdir()
    mnt = tmp_path / target
    fuse_unionfs = os.path.join(os.path.dirname(sys.executable), "fuse-unionfs")
    commands = [
        ("unionfs", [sys.executable, "-m", "unionfs", "image", "mount", "--store", store, "test/img:1", mnt]),
        ("unionfs", [sys.executable, "-m", "unionfs", "mount", "-o", f"lowerdir={tmp_path / 'lower'}", mnt]),
        ("fuse-unionfs", [fuse_unionfs, "-o", f"lowerdir={tmp_path / 'lower'}", mnt]),
    ]
    for prog, argv in commands:
        p = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr) == (1, f"{prog}: mountpoint {mnt}: {reason}\n"), argv
        assert not os.path.lexists(mnt) or target == "file"
    assert "img-1" not in unionfs("ps", "--store", store).stdout


def debian_like_layer() -> bytes:
    """A rootfs dpkg can install into: a shell, its own /dev/null, an empty dpkg database."""
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    return layer_tar(D("bin"), F("bin/busybox", busybox, mode=0o755), L("bin/sh", "busybox"),
                     D("dev"), CHR("dev/null", 1, 3, mode=0o666), D("tmp", mode=0o1777),
                     D("var"), D("var/lib"), D("var/lib/dpkg"), D("var/lib/dpkg/info"),
                     D("var/lib/dpkg/updates"), F("var/lib/dpkg/status"))


@pytest.mark.skipif(not IS_ROOT, reason="dpkg --root and device nodes need root")
@pytest.mark.skipif(not shutil.which("dpkg") or not os.path.exists("/bin/busybox"),
                    reason="needs dpkg and busybox-static")
def test_dpkg_installs_into_a_mounted_rootfs_and_runs_its_maintainer_script(env, tmp_path):
    """What apt-get install does in an image: dpkg unpacks a .deb into the
    rootfs and runs its postinst chrooted there; the script's write to the
    image's /dev/null must succeed, or dpkg fails the package."""
    store, mount = env
    deb = tiny_deb(tmp_path)
    docker_archive(tmp_path / "debianish.tar", [debian_like_layer()], tags=["test/debianish:1"])
    unionfs("image", "load", "--store", store, "-q", tmp_path / "debianish.tar")
    mnt, name = mount("test/debianish:1")
    p = subprocess.run(["dpkg", f"--root={mnt}", "-i", deb], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "/dev/null" not in p.stdout + p.stderr
    assert (mnt / "var/lib/tiny-configured").read_text() == "ok\n"
    diff = unionfs("diff", "--store", store, name).stdout.splitlines()
    assert {"A /usr/share/tiny/README", "A /var/lib/tiny-configured"} <= set(diff)


def test_ps_shows_the_image_by_the_name_it_was_mounted_by(env, tmp_path):
    """An image loaded as `base` (an OCI ref.name) and tagged `debian:base`,
    mounted as `debian:base`: `ps` says `debian:base`, not another name."""
    store, mount = env
    oci_layout(tmp_path / "layout", [BASE], ref="base")
    unionfs("image", "load", "--store", store, "-q", tmp_path / "layout")
    unionfs("image", "load", "--store", store, "-q", "--tag", "debian:base", tmp_path / "layout")
    mount("debian:base", name="deb")
    rows = [line.split() for line in unionfs("ps", "--store", store).stdout.splitlines()]
    assert ["deb", "debian:base"] in [r[:2] for r in rows]
    # Once the name means another image, ps shows one that still fits.
    unionfs("image", "load", "--store", store, "-q", "--tag", "debian:base", tmp_path / "image.tar")
    rows = [line.split() for line in unionfs("ps", "--store", store).stdout.splitlines()]
    assert ["deb", "base:latest"] in [r[:2] for r in rows]
