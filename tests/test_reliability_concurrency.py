"""Concurrency on a real mount: many processes at once.

- N processes append to the same lower files at the same moment: one
  copy-up each, no lost line, the lower content exactly once at the start;
- W workers create, rename (files and whole lower directories), delete,
  append and list in shared directories for a while, plus readers that only
  list: no deadlock (every process has a deadline), no error other than the
  ENOENT/ENOTEMPTY a concurrent worker can cause, every listing free of
  duplicates and markers and complete (names nobody touches are always
  there), and afterwards exactly the files that were not deleted survive,
  once each, with their content -- also after a remount.

Every file's content names it: "ID\\n" once per line (appends add lines with
the same id), so any surviving file can be checked whatever it was renamed to.
Names are never reused (each create and rename target is fresh), so a path
denotes one file for its whole life. A file is written before it gets its
"f-" name, so no worker can pick it empty.
"""

import collections
import json
import os
import subprocess
import time

import pytest

from conftest import requires_fuse
from reliability_helpers import (PY, alive, daemon_pid, mount_cli, quick_unmount,
                                 unmount_layers_after, work_leftovers)  # noqa: F401

pytestmark = [requires_fuse, pytest.mark.fuse]

SHARED = ["d0", "d1", "d2", "d3"]

WORKER = r"""
import errno, json, os, random, stat, sys, time
root, wid, seconds, role = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
shared, keep = json.loads(sys.argv[5]), json.loads(sys.argv[6])
rng = random.Random(wid)
seq = 0
counts, errs, unexpected = {}, {}, []
created, unlinked = [], []
listings = 0
WH = ".wh."

def fresh(prefix):
    global seq
    seq += 1
    return f"{prefix}-w{wid}-{seq}"

def note(op, e=None, allowed=()):
    counts[op] = counts.get(op, 0) + 1
    if e is None:
        return
    if e.errno in allowed:
        k = f"{op}:{errno.errorcode[e.errno]}"
        errs[k] = errs.get(k, 0) + 1
    else:
        unexpected.append(f"{op}: {e!r}")

def listing(d, op="list"):
    # One readdir; checks what any reader must always see.
    global listings
    try:
        with os.scandir(d) as it:
            ents = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                    for e in it]
    except OSError as e:
        note(op, e, (errno.ENOENT,))
        return None
    note(op)
    listings += 1
    names = [n for n, _, _ in ents]
    if len(names) != len(set(names)):
        dup = sorted(n for n in set(names) if names.count(n) > 1)
        unexpected.append(f"{op} {d}: names listed twice: {dup}")
    for n, isdir, isfile in ents:
        if n.startswith(WH):
            unexpected.append(f"{op} {d}: marker name {n!r} listed")
        elif not (isdir or isfile):
            unexpected.append(f"{op} {d}: {n!r} is neither file nor dir (a whiteout?)")
    top = os.path.basename(d)
    if top in keep:
        missing = set(keep[top]) - set(names)
        if missing:
            unexpected.append(f"{op} {d}: untouched names missing: {sorted(missing)}")
    return ents

def pick(kind):
    # A random entry of the given kind ("f" file, "D" dir) somewhere in the shared dirs.
    d = os.path.join(root, rng.choice(shared))
    ents = listing(d, "pick-list")
    if not ents:
        return None
    cand = [os.path.join(d, n) for n, isdir, _ in ents
            if n.startswith(kind + "-") and (isdir == (kind == "D"))]
    if kind == "f":
        for n, isdir, _ in ents:
            if isdir and n.startswith("D-") and rng.random() < 0.5:
                sub = listing(os.path.join(d, n), "pick-list")
                if sub:
                    cand += [os.path.join(d, n, m) for m, sd, _ in sub if m.startswith("f-")]
    return rng.choice(cand) if cand else None

def read_id(p):
    with open(p) as f:
        first = f.readline()
    return first.strip()

deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if role == "reader":
        listing(os.path.join(root, rng.choice(shared)))
        continue
    r = rng.random()
    d = os.path.join(root, rng.choice(shared))
    if r < 0.25:                                    # create a file
        ent = listing(d, "pick-list") if rng.random() < 0.3 else None
        subdirs = [n for n, isdir, _ in (ent or []) if isdir and n.startswith("D-")]
        parent = os.path.join(d, rng.choice(subdirs)) if subdirs else d
        # Written under a name nobody picks ("t-"), then renamed to its
        # "f-" name: a file picked by another worker always has its content
        # (an empty id is then a bug, not a reader that came too early).
        name = fresh("f")
        tmp = os.path.join(parent, "t" + name[1:])
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            note("create", e, (errno.ENOENT,))      # the subdir was renamed/removed
            continue
        with os.fdopen(fd, "w") as f:
            f.write((name + "\n") * rng.randint(1, 50))
        try:
            os.rename(tmp, os.path.join(parent, name))
        except OSError as e:
            note("create", e, (errno.ENOENT,))      # the subdir moved meanwhile: an orphan "t-"
            continue
        created.append(name)
        note("create")
    elif r < 0.40:                                  # delete a file
        p = pick("f")
        if p is None:
            continue
        try:
            fid = read_id(p)
            if not fid:
                unexpected.append(f"unlink: {p} read as empty")
                continue
            os.unlink(p)
        except OSError as e:
            note("unlink", e, (errno.ENOENT,))
            continue
        unlinked.append(fid)
        note("unlink")
    elif r < 0.60:                                  # rename a file (maybe across dirs)
        p = pick("f")
        if p is None:
            continue
        dst = os.path.join(root, rng.choice(shared), fresh("f"))
        try:
            os.rename(p, dst)
        except OSError as e:
            note("rename-file", e, (errno.ENOENT,))
            continue
        note("rename-file")
    elif r < 0.70:                                  # append to a file (copy-up)
        p = pick("f")
        if p is None:
            continue
        try:
            with open(p, "r+") as f:
                fid = f.readline().strip()
                if not fid:
                    unexpected.append(f"append: {p} read as empty")
                    continue
                f.seek(0, 2)
                f.write(fid + "\n")
        except OSError as e:
            note("append", e, (errno.ENOENT,))
            continue
        note("append")
    elif r < 0.78:                                  # make a directory
        try:
            os.mkdir(os.path.join(d, fresh("D")))
        except OSError as e:
            note("mkdir", e, ())
            continue
        note("mkdir")
    elif r < 0.86:                                  # rename a directory (lower ones too)
        p = pick("D")
        if p is None:
            continue
        try:
            os.rename(p, os.path.join(root, rng.choice(shared), fresh("D")))
        except OSError as e:
            note("rename-dir", e, (errno.ENOENT,))
            continue
        note("rename-dir")
    elif r < 0.90:                                  # remove a directory
        p = pick("D")
        if p is None:
            continue
        try:
            os.rmdir(p)
        except OSError as e:
            note("rmdir", e, (errno.ENOENT, errno.ENOTEMPTY))
            continue
        note("rmdir")
    else:
        listing(d)
print(json.dumps({"counts": counts, "errs": errs, "unexpected": unexpected[:50],
                  "n_unexpected": len(unexpected), "created": created,
                  "unlinked": unlinked, "listings": listings}))
"""


def build_lower(lower, keep_per_dir=5, files_per_dir=30, subdirs=3):
    """Shared dirs with untouched ``keep-*`` files, lower files ``f-L*`` and
    lower subdirectories ``D-L*`` holding more lower files. Returns
    (keep names per dir, ids of all lower f- files)."""
    keep, ids = {}, []
    for d in SHARED:
        (lower / d).mkdir()
        keep[d] = [f"keep-{d}-{i}" for i in range(keep_per_dir)]
        for k in keep[d]:
            (lower / d / k).write_text(k + "\n")
        for i in range(files_per_dir):
            name = f"f-L{d}-{i}"
            (lower / d / name).write_text((name + "\n") * (i % 5 + 1))
            ids.append(name)
        for j in range(subdirs):
            sub = lower / d / f"D-L{d}-{j}"
            sub.mkdir()
            for i in range(5):
                name = f"f-L{d}-{j}-{i}"
                (sub / name).write_text((name + "\n") * 3)
                ids.append(name)
    return keep, ids


def surviving_files(mnt):
    """{id: count} of every f- file under the shared dirs; checks each
    file's content is its own id on every line."""
    found = collections.Counter()
    bad = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in filenames:
            if not n.startswith("f-"):
                continue
            with open(os.path.join(dirpath, n)) as f:
                lines = f.read().splitlines()
            if not lines or len(set(lines)) != 1:
                bad.append((os.path.join(dirpath, n), lines[:3]))
                continue
            found[lines[0]] += 1
    assert not bad, f"files with torn or mixed content: {bad[:5]}"
    return found


def run_workers(mnt, seconds, writers, readers, keep):
    procs = []
    for w in range(writers + readers):
        role = "writer" if w < writers else "reader"
        procs.append(subprocess.Popen(
            [PY, "-c", WORKER, str(mnt), str(w), str(seconds), role, json.dumps(SHARED),
             json.dumps(keep)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, hung = [], []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=seconds + 120)
            except subprocess.TimeoutExpired:
                hung.append(p.pid)
                continue
            assert p.returncode == 0, f"worker crashed: {err[-2000:]}"
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not hung, f"workers {hung} did not finish {seconds + 120:.0f}s after their deadline (deadlock?)"
    return results


def _workers_test(layers, record_property, seconds, writers, readers, whiteout):
    keep, lower_ids = build_lower(layers.lowers[0])
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    pid = daemon_pid(mnt)
    t0 = time.monotonic()
    results = run_workers(mnt, seconds, writers, readers, keep)
    elapsed = time.monotonic() - t0
    assert alive(pid), "the daemon died"

    unexpected = [u for r in results for u in r["unexpected"]]
    assert not unexpected, f"{sum(r['n_unexpected'] for r in results)} unexpected results, " \
                           f"first ones: {unexpected[:10]}"
    counts, errs = collections.Counter(), collections.Counter()
    created, unlinked = [], []
    for r in results:
        counts.update(r["counts"])
        errs.update(r["errs"])
        created += r["created"]
        unlinked += r["unlinked"]
    assert len(unlinked) == len(set(unlinked)), "one file was deleted twice"
    expected = (set(lower_ids) | set(created)) - set(unlinked)
    assert set(unlinked) <= set(lower_ids) | set(created)

    def check():
        found = surviving_files(mnt)
        dups = {k: v for k, v in found.items() if v > 1}
        assert not dups, f"files present more than once: {list(dups.items())[:10]}"
        lost = expected - set(found)
        extra = set(found) - expected
        assert not lost, f"{len(lost)} files lost: {sorted(lost)[:10]}"
        assert not extra, f"{len(extra)} deleted files came back: {sorted(extra)[:10]}"
        for d in SHARED:
            assert set(keep[d]) <= set(os.listdir(mnt / d))

    check()
    quick_unmount(mnt)
    assert work_leftovers(layers) == []
    mnt = mount_cli(layers, f"whiteout={whiteout}")
    check()
    quick_unmount(mnt)

    ops = sum(counts.values())
    line = (f"concurrency (whiteout={whiteout}): {writers} writers + {readers} readers for "
            f"{elapsed:.1f}s, {ops} operations {dict(sorted(counts.items()))}, "
            f"expected races {dict(sorted(errs.items()))}, "
            f"{sum(r['listings'] for r in results)} listings checked, "
            f"{len(expected)} files survived")
    print("\n" + line)
    record_property("concurrency", line)
    # The run must have done real work of every kind.
    for op in ("create", "unlink", "rename-file", "rename-dir", "append", "mkdir", "list"):
        assert counts[op] > 0, f"no successful {op}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("whiteout", ["overlay", "oci"])
def test_parallel_workers_create_rename_delete_list(layers, record_property, whiteout):
    _workers_test(layers, record_property, 10, writers=6, readers=2, whiteout=whiteout)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("whiteout", ["overlay", "oci"])
def test_parallel_workers_long(layers, record_property, whiteout):
    _workers_test(layers, record_property, 90, writers=8, readers=2, whiteout=whiteout)


# Each appender says it is ready, then waits for the go (stdin closing):
# all first opens at one moment, however slowly the processes started.
APPENDER = r"""
import os, sys
path, wid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.write(1, b"ready\n")
sys.stdin.read()
for i in range(n):
    with open(path, "a") as f:
        f.write(f"{wid}:{i}\n")
"""


def _appenders(layers, rounds, writers, lines, lower_mib):
    lower = layers.lowers[1]
    heads = {}
    for r in range(rounds):
        head = "".join(f"lower {r} line {i}\n" for i in range(lower_mib * 40000))
        (lower / f"log{r}").write_text(head)
        heads[r] = head
    mnt = mount_cli(layers)
    for r in range(rounds):
        procs = [subprocess.Popen([PY, "-c", APPENDER, str(mnt / f"log{r}"), str(w), str(lines)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for w in range(writers)]
        try:
            for p in procs:                 # a blocking read, ended by the test's timeout
                assert p.stdout.readline() == b"ready\n", "an appender died before the start"
            for p in procs:
                p.stdin.close()             # go
            for p in procs:
                assert p.wait(timeout=120) == 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        got = (mnt / f"log{r}").read_text()
        assert got.startswith(heads[r]), "the lower content is not intact at the start"
        tail = got[len(heads[r]):].splitlines()
        want = [f"{w}:{i}" for w in range(writers) for i in range(lines)]
        missing = set(want) - set(tail)
        assert not missing, f"round {r}: {len(missing)} appended lines lost, e.g. {sorted(missing)[:5]}"
        assert sorted(tail) == sorted(want), f"round {r}: duplicated or foreign lines"
        # Each writer's lines are in its own order (O_APPEND: no reordering).
        for w in range(writers):
            mine = [int(l.split(":")[1]) for l in tail if l.startswith(f"{w}:")]
            assert mine == sorted(mine)
        assert (lower / f"log{r}").read_text() == heads[r], "the lower file changed"
    assert work_leftovers(layers) == []
    quick_unmount(mnt)
    return rounds * writers * lines


@pytest.mark.timeout(300)
def test_simultaneous_appends_to_lower_files(layers, record_property):
    n = _appenders(layers, rounds=4, writers=12, lines=100, lower_mib=1)
    record_property("appends", f"{n} appends by 12 processes to 4 lower files")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_simultaneous_appends_to_lower_files_long(layers, record_property):
    n = _appenders(layers, rounds=20, writers=16, lines=300, lower_mib=8)
    record_property("appends", f"{n} appends by 16 processes to 20 lower files")
