"""The benchmark's podman rows (scripts/bench.py): structure, not timings.

podman on each system's private storage runs the rows, and the table and
JSON say what a reader needs: a time per system, and for FUSE mount programs
the daemons' CPU, including daemons that came and went inside the command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from podman_helpers import STATIC_BUSYBOX, is_static_executable, mounts_under

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


PODMAN_ROWS = ["podman-build", "podman-run", "podman-reread", "podman-commit", "podman-diff"]


def test_podman_rows_are_workloads_for_every_system(bench):
    rows = [w for w in bench.WORKLOADS if w.podman is not None]
    assert [w.name for w in rows] == PODMAN_ROWS
    assert {w.dataset for w in rows} == {"podman"}
    # every column of the table is a podman storage set-up
    assert set(bench.PODMAN_STORAGE) == set(bench.SYSTEMS)
    args = bench.parse_args(["--quick", "--only", ",".join(PODMAN_ROWS)])
    assert [w.name for w in args.workloads] == PODMAN_ROWS


def _diff_output(files: int, drop: str = "") -> SimpleNamespace:
    lines = ["C /data", "A /data/new", "A /data/new/big.bin", "C /data/base",
             "C /data/base/modify.txt", "D /data/base/delete.txt"]
    for i in range(files):
        lines += [f"A /data/new/d{i // 100}", f"A /data/new/d{i // 100}/f{i}"]
    lines = [ln for ln in lines if ln != drop]
    return SimpleNamespace(stdout="\n".join(lines).encode() + b"\n")


def test_diff_check_fails_when_a_change_is_missing(bench):
    ds = bench.Dataset("podman", [], {"files": 250})
    bench._check_podman_diff(None, ds, _diff_output(250))
    for drop in ("A /data/new/d2/f249", "D /data/base/delete.txt", "C /data/base/modify.txt",
                 "A /data/new/big.bin"):
        with pytest.raises(bench.BenchError):
            bench._check_podman_diff(None, ds, _diff_output(250, drop=drop))


HAVE_PODMAN = bool(shutil.which("podman")) and bool(shutil.which("runc"))


@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="the podman rows run as root")
@pytest.mark.skipif(not HAVE_PODMAN, reason="podman and runc are not installed")
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
@pytest.mark.skipif(not is_static_executable(STATIC_BUSYBOX), reason="no busybox-static")
def test_podman_rows_run_on_private_storage(tmp_path):
    """run --rm and diff on kernel overlay and fuse-unionfs, one repetition."""
    out = tmp_path / "results.json"
    before = set(os.listdir("/tmp"))
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeat", "1",
         "--only", "podman-run,podman-diff", "--systems", "overlayfs,unionfs",
         "--loop-ext4", "0", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    for row in ("podman-run", "podman-diff"):
        for system in ("overlayfs", "unionfs"):
            cell = results[row]["systems"][system]
            assert cell["errors"] == [], (row, system, cell["errors"])
            assert len(cell["times_s"]) == 1
        assert results[row]["systems"]["overlayfs"]["daemon"] == []
    # run --rm: the container's mount came and went inside the timed command
    run_daemon, = results["podman-run"]["systems"]["unionfs"]["daemon"]
    assert run_daemon["exited_daemons"] == 1
    # diff: the running container's daemon, plus the image's mount podman made
    diff_daemon, = results["podman-diff"]["systems"]["unionfs"]["daemon"]
    assert diff_daemon["fds"] == diff_daemon["fds_after_mount"]
    assert diff_daemon["exited_daemons"] >= 1
    table = done.stdout
    assert "| podman-run |" in table and "| podman-diff |" in table
    assert "daemons came and went" in table
    # nothing left behind: no mounts, no private podman directories
    assert mounts_under(tmp_path) == []
    assert not [d for d in set(os.listdir("/tmp")) - before if d.startswith("unionfs-podman-")]
