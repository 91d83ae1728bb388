#!/usr/bin/env python3
"""Build the demo image: a small multi-layer docker-archive, deterministic
and offline, from the files in demo/ plus Debian's static busybox.

    scripts/make_demo_image.py [-o unionfs-demo.tar] [--busybox /bin/busybox]

Layers (see demo/README.md): a base with busybox and its applet symlinks,
one that changes a file, one that deletes a file (a `.wh.` whiteout), one
that replaces a directory (opaque `.wh..wh..opq`). Every entry has owner
0:0, a mode from its exec bit and one fixed mtime ($SOURCE_DATE_EPOCH if
set), so the same inputs give the same image ID.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unionfs.image import dockerarchive, oci  # noqa: E402
from unionfs.whiteout import WH_OPAQUE, WH_PREFIX  # noqa: E402

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo")
DEFAULT_TAG = "unionfs-demo:latest"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "find", "grep", "head", "mkdir", "rm", "stat", "tree", "vi", "wc")
MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class Layer:
    """Entries of one layer tar, written in name order."""

    def __init__(self):
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, name, type_, mode):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = type_, mode, MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def dir(self, name, mode=0o755):
        parent = os.path.dirname(name)
        if parent:
            self.dir(parent)
        if name not in self.entries:
            self.entries[name] = (self._info(name, tarfile.DIRTYPE, mode), None)

    def file(self, name, data: bytes, executable=False):
        if os.path.dirname(name):
            self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.REGTYPE, 0o755 if executable else 0o644)
        ti.size = len(data)
        self.entries[name] = (ti, data)

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.entries[name] = (ti, None)

    def whiteout(self, path):
        parent, base = os.path.split(path)
        self.file(os.path.join(parent, WH_PREFIX + base), b"")

    def opaque(self, directory):
        self.dir(directory)
        self.file(os.path.join(directory, WH_OPAQUE), b"")

    def tree(self, root):
        """Add the files under `root` (dirs implied), as the layer's paths."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    self.file(os.path.relpath(p, root), f.read(), os.access(p, os.X_OK))

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.entries, key=_layer_order):
                ti, data = self.entries[name]
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _layer_order(name: str):
    # Parents before children; in a directory, whiteouts before other entries.
    return [(0 if part.startswith(WH_PREFIX) else 1, part) for part in name.split("/")]


def build_layers(busybox: str) -> list[tuple[bytes, str]]:
    base = Layer()
    with open(busybox, "rb") as f:
        base.file("bin/busybox", f.read(), executable=True)
    for applet in APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.dir("tmp", mode=0o1777)
    base.dir("root", mode=0o700)
    base.tree(os.path.join(DEMO_DIR, "base"))

    change = Layer()
    change.tree(os.path.join(DEMO_DIR, "change"))

    delete = Layer()
    delete.dir("app")
    delete.whiteout("app/config.ini")

    replace = Layer()
    replace.dir("app")
    replace.opaque("app/data")
    replace.tree(os.path.join(DEMO_DIR, "replace"))

    return [(base.tar(), "base: busybox, /etc, /app"),
            (change.tar(), "change /etc/motd, add /app/VERSION"),
            (delete.tar(), "delete /app/config.ini"),
            (replace.tar(), "replace /app/data")]


def build_config(layers) -> bytes:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MTIME))
    return oci.canonical_json({
        "architecture": ARCH,
        "os": "linux",
        "created": created,
        "config": {"Env": ["PATH=/bin", "HOME=/root"], "Cmd": ["/bin/sh"], "WorkingDir": "/app"},
        "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t, _ in layers]},
        "history": [{"created": created, "created_by": why} for _, why in layers],
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="unionfs-demo.tar")
    p.add_argument("--busybox", help="busybox binary (default: /bin/busybox from busybox-static)")
    p.add_argument("--tag", default=DEFAULT_TAG)
    args = p.parse_args(argv)
    busybox = args.busybox or next((b for b in BUSYBOX_PATHS if os.path.isfile(b)), None)
    if not busybox or not os.path.isfile(busybox):
        print("make_demo_image: no busybox binary: install Debian's busybox-static "
              "(apt-get install busybox-static) or pass --busybox", file=sys.stderr)
        return 1
    layers = build_layers(busybox)
    config = build_config(layers)
    infos = [oci.LayerInfo(oci.sha256_digest(t), len(t), oci.MT_OCI_LAYER, oci.sha256_digest(t), len(t))
             for t, _ in layers]
    tars = {info.diff_id: tar for info, (tar, _) in zip(infos, layers)}
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as out:
        dockerarchive.write_archive(out, [(config, infos, [args.tag])], lambda l: io.BytesIO(tars[l.diff_id]))
    os.rename(tmp, args.output)
    print(f"{args.output}: {args.tag} ({len(layers)} layers, image ID {oci.sha256_digest(config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
