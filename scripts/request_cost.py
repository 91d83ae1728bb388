#!/usr/bin/env python3
"""The daemon's CPU per request, without the kernel.

Requests are built in a buffer and fed straight to the /dev/fuse binding's
dispatch (decode, fs.py, the union, the reply encoder); replies go to
/dev/null. What is left out is the kernel's side: reading the request from
/dev/fuse and waking the caller. So the figures are the Python a request
costs plus its system calls on the layers, steadier than timing real
mounts on a shared machine (docs/PERFORMANCE.md, "Where unionfs spends its
time"). Compare two versions with PYTHONPATH=<their tree>.

    .venv/bin/python scripts/request_cost.py [--requests N]
"""

import argparse
import os
import sys
import tempfile
import time

from unionfs import observe
from unionfs.binding import devfuse
from unionfs.binding import fuseproto as P
from unionfs.fs import UnionFS, Workers
from unionfs.fs import ll
from unionfs.union import Union


def build(base):
    """A union of one lower with one file, its fs.py adapter and session."""
    for d in ("lower", "upper", "work"):
        os.mkdir(os.path.join(base, d))
    with open(os.path.join(base, "lower", "f"), "w"):
        pass
    union = Union([os.path.join(base, "lower")], os.path.join(base, "upper"),
                  os.path.join(base, "work"))
    recorder = observe.Recorder()           # as mount.serve: every request timed
    union.copyup.observer = recorder
    fs = UnionFS(union, watch=recorder)
    session = devfuse.Session(fs.handlers(Workers()), passthrough=False)
    return fs, session


def measure(session, sink, opcode, nodeid, body, count):
    """CPU seconds per request of ``count`` identical requests."""
    buf = bytearray(devfuse.BUFFER_SIZE)
    mv = memoryview(buf)
    n = P.IN_HEADER.size + len(body)
    P.IN_HEADER.pack_into(buf, 0, n, opcode or P.GETATTR, 1, nodeid, 0, 0, os.getpid(), 0, 0)
    buf[P.IN_HEADER.size:n] = body
    handle = session._table[opcode] if opcode is not None else None
    t0 = time.process_time()
    for _ in range(count):
        # What Session.serve does per request after its readv.
        _, op, unique, nid, uid, gid, pid, _, _ = P.IN_HEADER.unpack_from(buf)
        req = devfuse.Request(session, sink, unique, nid, op, uid, gid, pid)
        if handle is None:
            devfuse.reply_err(req, 61)      # the binding's floor: nothing served
        else:
            handle(req, nid, buf, mv, n)
    return (time.process_time() - t0) / count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000, help="of each kind (default 50000)")
    args = ap.parse_args(argv)
    if ll is not devfuse:
        print("request_cost: the /dev/fuse binding is not in use "
              f"(UNIONFS_LIBFUSE={os.environ.get('UNIONFS_LIBFUSE', '')!r}, or no /dev/fuse)",
              file=sys.stderr)
        return 2
    sink = os.open(os.devnull, os.O_WRONLY)
    with tempfile.TemporaryDirectory() as base:
        fs, session = build(base)
        session.fd = sink
        measure(session, sink, P.LOOKUP, 1, b"f\0", 1)        # the kernel learns /f
        f = fs._by_path["/f"]       # a looked-up entry: its node id (compact form)
        f = f if isinstance(f, int) else f.nodeid
        kinds = [("reply only", None, f, b""),
                 ("GETXATTR", P.GETXATTR, f, P.GETXATTR_IN.pack(0, 0) + b"security.selinux\0"),
                 ("GETATTR", P.GETATTR, f, P.GETATTR_IN.pack(0, 0, 0)),
                 ("LOOKUP", P.LOOKUP, 1, b"f\0")]
        for name, opcode, nodeid, body in kinds:
            per = measure(session, sink, opcode, nodeid, body, args.requests)
            print(f"{name:12s} {per * 1e6:6.1f} us CPU")
    os.close(sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
