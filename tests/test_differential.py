"""Differential test: the filesystem under test against kernel overlayfs.

Random layer stacks (both whiteout formats, opaque directories, symlinks,
fifos, device nodes, xattrs) and random operation sequences are applied to a
kernel overlayfs mount and to the target mount; every result (value or errno)
and the final merged trees must agree, also after remounting the target and,
in overlay whiteout mode, when kernel overlayfs mounts the target's own
lower+upper. See tests/difftree.py for the machinery and for the (few,
commented) differences that are deliberately not compared.

Environment:
  DIFFTEST_TARGET  unionfs (default) | fuse-overlayfs (to check the harness)
  DIFFTEST_SEED    first seed (default 1 for the CI run, 100000 for the slow one)
  DIFFTEST_COUNT   number of sequences (default 210, slow run 2000)
  DIFFTEST_SHRINK  seconds to spend shrinking a divergence (default 120; 0: off)
"""

import os
import stat
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import difftree  # noqa: E402


def _kernel_overlay_available() -> bool:
    def listed():
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    if listed():
        return True
    subprocess.run(["modprobe", "overlay"], capture_output=True, timeout=30)
    return listed()


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root (kernel overlayfs mounts, trusted.* xattrs, whiteout devices)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not _kernel_overlay_available():
        return "kernel overlayfs not available"
    return None


pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def test_both_physical_copies_hold_the_same_logical_tree(tmp_path):
    """The harness itself: one seed gives one stack; the kernel copy is pure
    overlay format, the mixed copy writes OCI markers exactly where chosen."""
    import random
    stacks = [difftree.gen_stack(random.Random(7)) for _ in range(2)]
    assert stacks[0].describe() == stacks[1].describe()
    # Find a seed whose stack has both kinds of marker in both formats.
    for seed in range(1000):
        stack = difftree.gen_stack(random.Random(seed))
        entries = [(p, e) for layer in stack.lowers + [stack.upper] for p, e in layer.items()]
        kinds = {(e.kind == "whiteout", e.opaque, e.oci_marker) for _, e in entries}
        if {(True, False, True), (True, False, False),
                (False, True, True), (False, True, False)} <= kinds:
            break
    else:
        pytest.fail("no seed below 1000 generates every kind of marker")
    for fmt in ("overlay", "mixed"):
        for i, layer in enumerate(stack.lowers):
            root = str(tmp_path / f"{fmt}{i}")
            difftree.build_layer(layer, root, fmt, 0)
            for path, e in layer.items():
                p = os.path.join(root, path)
                d, name = os.path.split(p)
                oci = fmt == "mixed" and e.oci_marker
                if e.kind == "whiteout":
                    assert os.path.exists(os.path.join(d, ".wh." + name)) == oci
                    assert os.path.lexists(p) != oci
                    if not oci:
                        st = os.lstat(p)
                        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                elif e.kind == "dir":
                    assert os.path.exists(os.path.join(p, ".wh..wh..opq")) == (e.opaque and oci)
                    has_xattr = "trusted.overlay.opaque" in os.listxattr(p)
                    assert has_xattr == (e.opaque and not oci)
                else:
                    st = os.lstat(p)
                    assert difftree.norm_stat(st)["type"] == e.kind
                    assert st.st_mtime_ns == e.mtime_ns


def _run_many(tmp_path, record_property, default_seed, default_count):
    first = int(os.environ.get("DIFFTEST_SEED", default_seed))
    count = int(os.environ.get("DIFFTEST_COUNT", default_count))
    shrink_s = float(os.environ.get("DIFFTEST_SHRINK", 120))
    target = difftree.FuseTarget()
    stats = difftree.Stats()
    failure = None
    try:
        for seed in range(first, first + count):
            try:
                difftree.run_sequence(seed, str(tmp_path), target, stats=stats)
            except difftree.Divergence as d:
                shrunk = None
                if shrink_s > 0:
                    ops = [op for op, _, _ in d.executed]
                    shrunk = difftree.shrink(seed, str(tmp_path), target, ops, shrink_s)
                failure = difftree.report(seed, target, d, shrunk)
                break
    finally:
        summary = stats.line(target.name) + f" seeds={first}..{first + count - 1}"
        print("\n" + summary)
        record_property("differential", summary)
    if failure:
        pytest.fail(failure, pytrace=False)
    assert stats.sequences == count
    # A run where nearly every operation failed would compare little.
    assert stats.errno_results < stats.operations * 0.6


@pytest.mark.timeout(1200)
def test_differential_against_kernel_overlayfs(tmp_path, record_property):
    _run_many(tmp_path, record_property, default_seed=1, default_count=210)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_differential_against_kernel_overlayfs_long(tmp_path, record_property):
    _run_many(tmp_path, record_property, default_seed=100000, default_count=2000)
