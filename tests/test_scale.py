"""The daemon's node table on a real mount: what the kernel forgets (FORGET,
BATCH_FORGET) is freed, whichever form the daemon kept it in (compact for an
entry only looked up, a full Inode once opened), and what is looked up again
afterwards shows the same."""

import json
import os

from conftest import UNIONFS, requires_fuse, requires_root, run, wait_for

DIRS, FILES = 20, 100


def kernel_inodes(mnt):
    r = run([UNIONFS, "stats", "--json", str(mnt)])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["kernel_inodes"]


def drop_dentries_and_inodes():
    """The kernel forgets every unused dentry and inode (root only): a FUSE
    daemon then gets FORGET / BATCH_FORGET for them."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def sizes(top):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, top)] = (os.lstat(p).st_size, os.lstat(p).st_ino)
    return out


@requires_fuse
@requires_root
def test_forgotten_nodes_are_freed(layers, mounted):
    low = layers.lowers[0]
    for d in range(DIRS):
        (low / f"d{d:02}").mkdir()
        for j in range(FILES):
            (low / f"d{d:02}" / f"f{j:02}").write_bytes(b"x" * j)
    (layers.lowers[1] / "d00").mkdir()
    (layers.lowers[1] / "d00" / "below").write_text("below")
    mnt = mounted()
    seen = sizes(mnt)
    assert len(seen) == DIRS * FILES + 1
    # Some entries get opened (and one copied up): those are full Inodes.
    for j in range(10):
        with open(mnt / "d01" / f"f{j:02}", "rb") as f:
            assert f.read() == b"x" * j
    with open(mnt / "d02" / "f05", "ab") as f:
        f.write(b"y")
    (mnt / "d03" / "f07").rename(mnt / "d03" / "moved")
    os.link(mnt / "d02" / "f05", mnt / "d02" / "link")
    held = kernel_inodes(mnt)
    assert held >= DIRS * FILES

    def forgotten():
        drop_dentries_and_inodes()
        return kernel_inodes(mnt) < 10
    assert wait_for(forgotten, timeout=30, interval=0.5), kernel_inodes(mnt)

    # Looked up again: the same sizes and inode numbers.
    again = sizes(mnt)
    seen["d02/f05"] = (6, seen["d02/f05"][1])
    seen["d02/link"] = seen["d02/f05"]
    seen["d03/moved"] = seen.pop("d03/f07")
    assert again == seen
    assert kernel_inodes(mnt) >= DIRS * FILES
