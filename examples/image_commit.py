#!/usr/bin/env python3
"""Example: mount an image as a container rootfs, run something in it,
see what changed, and commit the result as a new image.

    python examples/image_commit.py IMAGE.tar [--store DIR] [-o OUT.tar]

IMAGE.tar is a ``docker save`` archive or an OCI layout (for instance the
demo image: ``python scripts/make_demo_image.py -o demo.tar``). Without
``--store`` a temporary store is used and removed at the end. As root, and
when the image has a ``/bin/sh``, the step runs inside the image with
chroot; otherwise it changes the rootfs from Python.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import unionfs
from unionfs.images import Store

STEP = "mkdir -p /app && echo built > /app/artifact && rm -f /etc/motd"


def build_step(rootfs: Path) -> None:
    chroot = shutil.which("chroot")
    if os.geteuid() == 0 and chroot and (rootfs / "bin" / "sh").exists():
        subprocess.run([chroot, str(rootfs), "/bin/sh", "-c", STEP], check=True,
                       env={"PATH": "/bin:/usr/bin"})
    else:
        (rootfs / "app").mkdir(exist_ok=True)
        (rootfs / "app" / "artifact").write_text("built\n")
        (rootfs / "etc" / "motd").unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive")
    p.add_argument("--store", help="image store (default: a temporary one)")
    p.add_argument("-o", "--output", help="also save the new image to this docker-archive")
    args = p.parse_args(argv)

    store_dir = args.store or tempfile.mkdtemp(prefix="unionfs-example-store-")
    try:
        store = Store(store_dir)
        [image] = store.load(args.archive)
        with store.mount(image.id) as m:          # a temporary mount point
            build_step(Path(m.path))
            for change in m.changes():
                print(change)
        # Unmounted; the container's upper stays in the store until committed.
        new = store.commit(m, "example:built", message="example: " + STEP)
        print("committed", new.id)
        if args.output:
            store.save("example:built", args.output)
            print("saved", args.output)
    except unionfs.UnionfsError as e:
        print(f"image_commit: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.store:
            shutil.rmtree(store_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
