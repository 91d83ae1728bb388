#!/usr/bin/env python3
"""Push and pull of a ~200 MB image: unionfs against skopeo, on one local
registry (docker-registry, plain http on 127.0.0.1).

    .venv/bin/python scripts/bench_registry.py [--reps 5] [--mb 200] [--layers 4]

Method:
- The image: LAYERS layers of random (incompressible) file data, gzip
  compressed (level 1, as the layer blobs of a real image are), ~MB MB of
  blobs in all; loaded into a unionfs store and written as an OCI layout
  (skopeo's source for push).
- push: unionfs `push` from its store; skopeo `copy oci:LAYOUT docker://...`.
  Every push goes to a fresh registry (new port, new storage), so neither
  tool can skip or mount a blob it sent before (skopeo keeps a blob-info
  cache keyed by registry; unionfs keeps blob-sources.json).
- pull: unionfs `pull` into a fresh store (download, verify, unpack and
  keep the blob); skopeo `copy docker://... oci:DIR` (download and verify
  only) and `copy docker://... containers-storage:[vfs@...]` (download,
  verify and unpack, what `podman pull` does), each into a fresh directory.
- Within each repetition the tools run back to back, their order alternating
  from one repetition to the next (the machine is shared); the table shows
  medians of wall-clock seconds and of CPU seconds (user+sys of the child).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from registry_helpers import image_manifest, oci_layout, start_registry  # noqa: E402

UNIONFS = [sys.executable, "-m", "unionfs"]
SKOPEO = ["skopeo", "--insecure-policy"]


def layer(mb_each: int, i: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for j in range(mb_each // 8 or 1):
            data = os.urandom(8 << 20)
            ti = tarfile.TarInfo(f"layer{i}/file{j}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def timed(cmd, env=None) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {r.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir="/var/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_AUTH_FILE"] = str(work / "auth.json")       # ours and skopeo's, empty
    results: dict[str, list[tuple[float, float]]] = {}
    registries = []
    try:
        print(f"building a {args.mb} MB image in {args.layers} layers ...", file=sys.stderr)
        tars = [layer(args.mb // args.layers, i) for i in range(args.layers)]
        from image_helpers import config_for
        config = config_for(tars)
        layout = work / "layout"
        # gzip level 1 keeps the set-up short; random data barely compresses anyway
        import image_helpers
        image_helpers.compress = lambda tar, how: gzip.compress(tar, compresslevel=1, mtime=0)
        oci_layout(layout, "v1", image_manifest(layout, [(t, "gzip") for t in tars], config))
        del tars
        store = work / "store"
        subprocess.run(UNIONFS + ["image", "load", "-q", "--store", store, "--tag", "bench:1", layout],
                       check=True, env=env)
        blob_mb = sum(f.stat().st_size for f in (layout / "blobs/sha256").iterdir()) / 1e6
        print(f"image: {blob_mb:.0f} MB of blobs", file=sys.stderr)

        def fresh_registry():
            reg = start_registry("plain", work / f"reg{len(registries)}")
            registries.append(reg)
            return reg

        def push_unionfs(rep):
            reg = fresh_registry()
            return timed(UNIONFS + ["push", "-q", "--store", store, "--tls-verify=false", "bench:1",
                                    f"{reg.host}/bench/app:v1"], env)

        def push_skopeo(rep):
            reg = fresh_registry()
            return timed(SKOPEO + ["copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1",
                                   f"docker://{reg.host}/bench/app:v1"], env)

        source = fresh_registry()
        subprocess.run(SKOPEO + ["copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1",
                                 f"docker://{source.host}/bench/app:v1"], check=True, env=env)
        src = f"{source.host}/bench/app:v1"

        def pull_unionfs(rep):
            return timed(UNIONFS + ["pull", "-q", "--store", work / f"pull-u{rep}", "--tls-verify=false", src], env)

        def pull_skopeo_oci(rep):
            return timed(SKOPEO + ["copy", "-q", "--src-tls-verify=false", f"docker://{src}",
                                   f"oci:{work / f'pull-so{rep}'}:v1"], env)

        def pull_skopeo_storage(rep):
            d = work / f"pull-ss{rep}"
            return timed(SKOPEO + ["copy", "-q", "--src-tls-verify=false", f"docker://{src}",
                                   f"containers-storage:[vfs@{d}/root+{d}/run]{src}"], env)

        groups = {"push": [("unionfs", push_unionfs), ("skopeo", push_skopeo)],
                  "pull": [("unionfs", pull_unionfs), ("skopeo oci:", pull_skopeo_oci),
                           ("skopeo containers-storage:", pull_skopeo_storage)]}
        for rep in range(args.reps):
            for op, tools in groups.items():
                order = tools if rep % 2 == 0 else list(reversed(tools))
                for name, fn in order:
                    subprocess.run(["sync"])
                    results.setdefault(f"{op}: {name}", []).append(fn(rep))
            for reg in registries[1:]:
                reg.stop()
                shutil.rmtree(reg.base, ignore_errors=True)
            del registries[1:]
            for d in work.glob("pull-*"):
                subprocess.run(["rm", "-rf", str(d)])
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
        print(f"| operation ({blob_mb:.0f} MB, {args.layers} layers) | wall s (median of {args.reps}) "
              f"| CPU s (median) |")
        print("|---|---|---|")
        for key, samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            print(f"| {key} | {wall:.2f} | {cpu:.2f} |")
        print(json.dumps({k: v for k, v in results.items()}), file=sys.stderr)
    finally:
        for reg in registries:
            reg.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
