"""What copy-on-write did, as it happens: the hook the semantic core calls
(DESIGN.md §8).

``copyup.py`` and ``namespace.py`` report each change to the upper that the
user did not ask for in so many words -- a copy-up, a whiteout, an opaque
directory, a directory copied whole before a rename -- to an ``Observer``.
The default observer does nothing, so the core stays plain and testable
without a mount; the daemon installs a ``Recorder`` (counters, a ring of
recent events, listeners), which ``control.py`` serves on the mount's
control socket.

Cost. Request timing and counters are plain integer updates without locks
(CPython may lose an increment when two threads race on one counter: these
are statistics, not accounts). Events are rare next to requests and each
costs at least a rename in the upper, so recording one in the ring (a tuple
appended to a bounded deque) is always done; handing it to listeners
happens only while someone listens (``Recorder.listening``). A listener's
queue is bounded: a reader that stalls loses the oldest events, counted,
and never holds up the filesystem.
"""

import _thread   # as in layers.py: no threading, collections at start-up
import time
from _collections import deque

# Event kinds.
COPY_UP = "copy-up"             # an entry copied from a lower into the upper
COPY_UP_META = "copy-up-meta"   # metadata only: the data stays in the lower
                                # (metacopy; reported with copied_up(meta=True))
WHITEOUT = "whiteout"           # a removed name now hides the lower entry
OPAQUE = "opaque"               # an upper directory now hides all below it
DIR_COPY = "dir-copy"           # a merged directory copied whole (rename)
KINDS = (COPY_UP, COPY_UP_META, WHITEOUT, OPAQUE, DIR_COPY)

RING_SIZE = 1024                # recent events kept for `unionfs events`
LISTENER_QUEUE = 1024           # events a listener may fall behind by

# Latency histogram: 4 buckets per power of two of nanoseconds (each bucket
# about 19% wide), 0 ns .. 2**63 ns.
_SUB = 2                        # log2 of buckets per power of two
_SUB_MASK = (1 << _SUB) - 1
BUCKETS = 64 << _SUB


def bucket_of(ns):
    """The histogram bucket of a duration of ``ns`` nanoseconds."""
    b = ns.bit_length()
    return (b << _SUB) | ((ns >> (b - 1 - _SUB)) & _SUB_MASK) if b > _SUB else ns


def bucket_bounds(i):
    """(low, high) nanoseconds that bucket ``i`` covers, high exclusive."""
    b, sub = i >> _SUB, i & _SUB_MASK
    if b <= _SUB:
        return i, i + 1
    width = 1 << (b - 1 - _SUB)
    low = (1 << (b - 1)) + sub * width
    return low, low + width


def quantile(hist, q):
    """The upper bound (ns) of the bucket holding quantile ``q`` of ``hist``,
    or None for an empty one."""
    total = sum(hist)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if n and seen >= rank:
            return bucket_bounds(i)[1]
    return None


class Observer:
    """What the core reports; this one ignores everything."""

    def copied_up(self, path, nbytes, ns, meta=False):
        """``path`` now has an upper copy (``nbytes`` of data copied in
        ``ns`` nanoseconds); ``meta``: only its metadata was copied."""

    def dir_copied(self, path, nbytes, ns):
        """Merged directory ``path`` was copied up whole (before a rename)."""

    def whiteout(self, path):
        """``path`` was removed and a whiteout hides what lower layers have."""

    def opaque(self, path):
        """Upper directory ``path`` was made opaque."""


NO_OBSERVER = Observer()


class Listener:
    """One follower of the events: a bounded queue the daemon fills and the
    follower's connection drains. ``dropped`` counts what did not fit."""

    def __init__(self, size=LISTENER_QUEUE):
        self.queue = deque()
        self.size = size
        self.dropped = 0
        import threading    # a follower of the events only
        self.wake = threading.Event()

    def put(self, event):
        if len(self.queue) >= self.size:
            self.dropped += 1
            return
        self.queue.append(event)
        self.wake.set()


class Recorder(Observer):
    """The daemon's observer: counters, latency histograms per request, a
    ring of recent events and the listeners that follow them.

    ``current_op`` is the name of the FUSE request the calling thread is
    serving (set by the dispatcher that ``timer`` serves), so an event says
    what caused it.
    """

    def __init__(self, ring=RING_SIZE):
        self.started = time.time()
        self.requests = {}                  # op name -> histogram (list of counts)
        self.copy_ups = [0, 0, 0]           # count, bytes, ns
        self.meta_copy_ups = [0, 0]         # count, ns
        self.dir_copies = [0, 0, 0]         # count, bytes, ns
        self.whiteouts = 0
        self.opaques = 0
        self.ring = deque(maxlen=ring)
        self.listeners = []
        self.listening = False
        self.dropped = 0                    # by listeners gone since
        self._local = _thread._local()
        self._listeners_lock = _thread.allocate_lock()   # add/remove only

    # -- requests ---------------------------------------------------------------

    @property
    def current_op(self):
        return getattr(self._local, "op", None)

    def timer(self, name):
        """(histogram, thread-local) of request ``name``, for a dispatcher
        that times requests itself (fs.UnionFS._dispatch): it sets
        ``local.op`` to ``name`` while serving and counts each duration into
        the histogram at ``bucket_of(ns)``."""
        return self.requests.setdefault(name, [0] * BUCKETS), self._local

    # -- events ----------------------------------------------------------------------

    def _event(self, kind, path, nbytes=0, ns=0):
        event = (time.time(), kind, path, self.current_op, nbytes, ns)
        self.ring.append(event)
        if self.listening:
            for listener in self.listeners:
                listener.put(event)

    def copied_up(self, path, nbytes, ns, meta=False):
        if meta:
            c = self.meta_copy_ups
            c[0] += 1
            c[1] += ns
        else:
            c = self.copy_ups
            c[0] += 1
            c[1] += nbytes
            c[2] += ns
        self._event(COPY_UP_META if meta else COPY_UP, path, nbytes, ns)

    def dir_copied(self, path, nbytes, ns):
        c = self.dir_copies
        c[0] += 1
        c[1] += nbytes
        c[2] += ns
        self._event(DIR_COPY, path, nbytes, ns)

    def whiteout(self, path):
        self.whiteouts += 1
        self._event(WHITEOUT, path)

    def opaque(self, path):
        self.opaques += 1
        self._event(OPAQUE, path)

    # -- listeners ---------------------------------------------------------------------

    def listen(self, size=LISTENER_QUEUE):
        listener = Listener(size)
        with self._listeners_lock:
            # A new list, not a change to the one being iterated by _event.
            self.listeners = self.listeners + [listener]
            self.listening = True
        return listener

    def unlisten(self, listener):
        with self._listeners_lock:
            self.listeners = [x for x in self.listeners if x is not listener]
            self.listening = bool(self.listeners)
            self.dropped += listener.dropped

    def recent(self):
        return list(self.ring)

    def snapshot(self):
        """The counters as plain data (see control.py for the full stats)."""
        ops = {}
        for name, hist in list(self.requests.items()):
            h = list(hist)
            count = sum(h)
            if count:
                ops[name] = {"count": count, "p50_us": _us(quantile(h, 0.5)),
                             "p99_us": _us(quantile(h, 0.99))}
        listeners = list(self.listeners)
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": ops,
            "copy_up": {"count": self.copy_ups[0], "bytes": self.copy_ups[1],
                        "seconds": round(self.copy_ups[2] / 1e9, 6)},
            "copy_up_meta": {"count": self.meta_copy_ups[0],
                             "seconds": round(self.meta_copy_ups[1] / 1e9, 6)},
            "dir_copy": {"count": self.dir_copies[0], "bytes": self.dir_copies[1],
                         "seconds": round(self.dir_copies[2] / 1e9, 6)},
            "whiteouts": self.whiteouts,
            "opaque_dirs": self.opaques,
            "events": {"recorded": len(self.ring), "listeners": len(listeners),
                       "dropped": self.dropped + sum(x.dropped for x in listeners)},
        }


def _us(ns):
    return None if ns is None else round(ns / 1000, 1)


def event_dict(event):
    """An event tuple as the JSON object `unionfs events --json` prints."""
    t, kind, path, op, nbytes, ns = event
    return {"time": round(t, 6), "kind": kind, "path": path, "op": op,
            "bytes": nbytes, "duration_us": round(ns / 1000, 1)}
