"""The mount's control socket: stats, events and `which`, served by the
daemon (DESIGN.md §8).

The socket lives beside the daemon's pidfile (``KEY.sock`` next to
``KEY.pid``), mode 0600 in a 0700 directory, and every connection is checked
with SO_PEERCRED: only the mount's owner (the daemon's user) is served; any
other uid gets one refusal line. The file mode alone is not trusted: a
process with CAP_DAC_OVERRIDE passes it.

Protocol: the client sends one JSON object on one line --
``{"cmd": "stats"}``, ``{"cmd": "events", "follow": bool}`` or
``{"cmd": "which", "path": MERGED}`` -- and reads JSON lines back until
the daemon closes the connection (``events`` with ``follow`` never does).
A line ``{"error": ...}`` says why a request was refused.

One thread accepts; each connection gets its own thread, so a client that
stops reading blocks only its own thread (see observe.Listener for how the
filesystem is kept from waiting on it).

Start-up: the daemon listens with ``_socket`` (the C module under
``socket``) and loads ``socket`` itself (its classes, enums and selectors:
~2.5 ms of CPU) only when a client connects: every container start waits
for the daemon's first replies, few ever ask it for stats.
"""

import errno
import os
import _socket
import stat
import struct
import threading

from unionfs.errors import UserError
from unionfs.observe import event_dict

SUFFIX = ".sock"
_MAX_REQUEST = 64 << 10
_IDLE_CHECK = 1.0       # seconds between checks that a follower is still there
_REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request


def socket_for(pidfile):
    """The control socket's path for the daemon whose pidfile is ``pidfile``."""
    return pidfile[:-len(".pid")] + SUFFIX


def is_stale(path):
    """True if nothing listens on control socket ``path`` any more (its
    daemon was killed before it could remove it): connecting is refused."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False        # not ours to judge (gone already, not a socket, no access)
    finally:
        sock.close()
    return False


def peer_uid(conn):
    """The uid of the process at the other end of unix socket ``conn``."""
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _send(conn, obj):
    import json     # here and below: a daemon loads it (and re) at its first request, not at start
    conn.sendall(json.dumps(obj).encode() + b"\n")


class Server:
    """Serves ``recorder`` (observe.Recorder) and ``union`` on ``path``.

    ``extra()`` adds daemon-side figures to stats (open files, the kernel's
    inode count), read when asked.
    """

    def __init__(self, path, recorder, union, extra=None):
        self.path = path
        self.recorder = recorder
        self.union = union
        self.extra = extra
        self.owner = os.geteuid()
        self._sock = None

    def start(self):
        """Bind (under a temporary name, made 0600, then renamed into place:
        the socket is never reachable with another mode) and start serving."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        _unlink(tmp)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(16)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            _unlink(tmp)
            raise
        self._sock = sock
        threading.Thread(target=self._accept, name="unionfs-control", daemon=True).start()

    def stop(self):
        if self._sock is not None:
            _unlink(self.path)
            try:
                self._sock.shutdown(_socket.SHUT_RDWR)   # wakes accept()
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    def _accept(self):
        sock = self._sock
        while True:
            try:
                fd, _ = sock._accept()      # close-on-exec, as socket.accept's
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    continue
                return          # closed by stop()
            import socket       # at the first client (see the module's doc)
            conn = socket.socket(fileno=fd)
            threading.Thread(target=self._serve, args=(conn,), name="unionfs-control-conn",
                             daemon=True).start()

    def _serve(self, conn):
        try:
            with conn:
                uid = peer_uid(conn)
                if uid != self.owner:
                    _refuse(conn, f"refused: uid {uid} is not the mount's owner")
                    return
                conn.settimeout(_REQUEST_TIMEOUT)
                request = self._read_request(conn)
                if request is None:
                    return
                conn.settimeout(None)
                self._answer(conn, request)
        except OSError:
            pass        # the client went away: nothing to tell it

    def _answer(self, conn, request):
        cmd = request.get("cmd")
        try:
            if cmd == "events":
                self._events(conn, bool(request.get("follow")))
                return
            if cmd == "stats":
                reply = self.stats()
            elif cmd == "which":
                reply = self.which(request.get("path"))
            else:
                reply = {"error": f"unknown request {cmd!r}"}
        except OSError as e:        # reading a layer failed
            reply = {"error": f"{cmd}: {e.strerror or e}"}
        except Exception as e:      # a bug: say what, in one line
            import logging      # only here: a daemon start need not load it
            logging.getLogger("unionfs").exception("unionfs: control request %r failed", cmd)
            reply = {"error": f"internal error: {type(e).__name__}: {e}"}
        _send(conn, reply)

    @staticmethod
    def _read_request(conn):
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            buf += chunk
            if len(buf) > _MAX_REQUEST:
                _send(conn, {"error": "request too long"})
                return None
        import json
        try:
            request = json.loads(buf.partition(b"\n")[0])
        except ValueError:
            request = None
        if not isinstance(request, dict):
            _send(conn, {"error": "a request is one JSON object on one line"})
            return None
        return request

    # -- requests -------------------------------------------------------------------

    def stats(self):
        out = self.recorder.snapshot()
        out.update(process_stats())
        out["open_files"] = self.open_files()
        if self.extra is not None:
            out.update(self.extra())
        return out

    def open_files(self):
        """Files open through the mount: the daemon's descriptors on files
        in the layers (each open of a merged file holds one). Directories
        do not count: those are the daemon's own handles (layers.py; an
        open merged directory holds no descriptor)."""
        roots = tuple(layer.root + "/" for layer in self.union.stack.layers)
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(roots) and \
                        not stat.S_ISDIR(os.stat(f"/proc/self/fd/{fd}").st_mode):
                    n += 1
            except OSError:
                continue        # closed meanwhile
        return n

    def _events(self, conn, follow):
        """The ring's events; with ``follow``, then every new one until the
        client goes. Events that did not fit the listener's queue are
        announced with one {"dropped": N} line (N: the total so far)."""
        rec = self.recorder
        listener = rec.listen() if follow else None
        try:
            recent = rec.recent()
            seen = {id(e) for e in recent}
            for event in recent:
                _send(conn, event_dict(event))
            if listener is None:
                return
            reported = 0
            queue = listener.queue
            while True:
                listener.wake.wait(_IDLE_CHECK)
                listener.wake.clear()
                while queue:
                    event = queue.popleft()
                    if id(event) in seen:
                        continue        # sent from the ring already
                    _send(conn, event_dict(event))
                seen = ()
                if listener.dropped != reported:
                    reported = listener.dropped
                    _send(conn, {"dropped": reported})
                if _peer_closed(conn):
                    return
        finally:
            if listener is not None:
                rec.unlisten(listener)

    def which(self, path):
        """Where merged ``path`` comes from (see `unionfs which`)."""
        if not _merged_path(path):
            return {"error": f"not a merged path: {path!r}"}
        stack = self.union.stack
        node = stack.lookup(path)
        if node is None:
            return {"error": f"{path}: no such file or directory in the merged view"}
        upper = self.union.upper
        out = {"path": path, "kind": "directory" if node.is_dir else "file",
               "upper": upper.root if upper is not None else None,
               "layers": [_layer_obj(layer) for layer in node.layers]}
        top = node.top
        out.update(_layer_obj(top))
        # Below an upper entry: a lower entry of that name it was copied up
        # from (or that it replaced: the layers cannot tell the two apart),
        # which an opaque directory hides.
        below = stack.lookup_below(path) if top.upper else None
        out["copied_up"] = below is not None
        out["from"] = _layer_obj(below.top) if below is not None else None
        out["opaque"] = bool(node.is_dir and top.upper and self.union.upper.is_opaque(path))
        return out


def _refuse(conn, why):
    """Say ``why`` and hang up without reading the request. What it sent
    is drained first (briefly): closing a unix socket with unread data
    resets it, and the client could lose the reason."""
    _send(conn, {"error": why})
    conn.shutdown(_socket.SHUT_WR)
    conn.settimeout(_REQUEST_TIMEOUT)
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass


def _merged_path(path):
    """True for an absolute path without empty, "." or ".." components."""
    if not isinstance(path, str) or not path.startswith("/"):
        return False
    return path == "/" or all(c not in ("", ".", "..") for c in path[1:].split("/"))


def _layer_obj(layer):
    return {"layer": "upper" if layer.upper else "lower", "index": layer.index,
            "dir": layer.root}


def _peer_closed(conn):
    """True if the client closed its end (it sends nothing after its request)."""
    try:
        return conn.recv(1, _socket.MSG_DONTWAIT | _socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_stats():
    """The daemon's RSS, CPU time and threads, from /proc/self."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # Fields after the command: state is [0]; utime, stime [11], [12];
    # num_threads [17]; rss in pages [21].
    return {"rss_bytes": int(fields[21]) * _PAGE,
            "cpu_user_s": int(fields[11]) / _CLK_TCK,
            "cpu_system_s": int(fields[12]) / _CLK_TCK,
            "threads": int(fields[17])}


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the client side ---------------------------------------------------------------

def request_one(path, obj, what):
    """The one reply to request ``obj`` (see request)."""
    for reply in request(path, obj, what):
        return reply
    raise UserError(f"{what}: the daemon closed the connection without an answer")


def request(path, obj, what):
    """Send request ``obj`` to the control socket at ``path``; yield the
    reply's JSON objects. ``what`` names the mount in error messages."""
    import json
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise UserError(f"{what}: no control socket (is the daemon older than this command?)")
        except PermissionError:
            raise UserError(f"{what}: permission denied: the mount belongs to another user")
        except ConnectionRefusedError:
            raise UserError(f"{what}: the daemon is not answering (did it die?)")
        sock.sendall(json.dumps(obj).encode() + b"\n")
        with sock.makefile("rb") as f:
            for line in f:
                reply = json.loads(line)
                if "error" in reply:
                    raise UserError(f"{what}: {reply['error']}")
                yield reply
    finally:
        sock.close()
