"""`-t`: the runtime makes the container's pty and hands its master over a
unix socket (`--console-socket`, SCM_RIGHTS); we copy bytes between it and
the user's terminal (or the log of a detached container)."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import tempfile
import termios
import time
import tty as _tty

ACCEPT_TIMEOUT = 60     # seconds the runtime has to send the master


class ConsoleSocket:
    """A listening unix socket in a fresh short-named temp dir (sun_path
    holds 108 bytes; store paths can be longer)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="unionfs-tty-")
        self.path = os.path.join(self.dir, "console.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)

    def receive(self, alive) -> int | None:
        """The pty master the runtime sends, or None if `alive()` turns
        false (the runtime failed) before it does."""
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + ACCEPT_TIMEOUT
        while True:
            try:
                conn, _ = self.sock.accept()
                break
            except socket.timeout:
                if not alive() or time.monotonic() > deadline:
                    return None
        with conn:
            fds = array.array("i")
            _, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            raise OSError(errno.EPROTO, "the runtime sent no console")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self):
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def copy_winsize(src_fd: int, dst_fd: int):
    """Give the pty `dst_fd` the window size of terminal `src_fd`, if it is one."""
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst_fd, termios.TIOCSWINSZ, size)


@contextlib.contextmanager
def raw(fd: int | None):
    """Terminal `fd` in raw mode (the container's pty does the line
    discipline), restored afterwards; nothing if it is not a terminal."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    _tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def proxy(master: int, in_fd: int | None, out_fd: int, finished) -> None:
    """Copy master -> out_fd and in_fd -> master until the pty closes (every
    process of the container is gone) or `finished()` says so and nothing
    more is pending."""
    readers = [master] + ([in_fd] if in_fd is not None else [])
    while True:
        try:
            ready, _, _ = select.select(readers, [], [], 0.2)
        except InterruptedError:
            continue
        if not ready and finished():
            return
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                data = b""          # EIO: the last slave fd was closed
            if fd == master:
                if not data:
                    return
                with contextlib.suppress(OSError):
                    _write_all(out_fd, data)
            elif data:
                _write_all(master, data)
            else:
                readers.remove(fd)  # the user's input ended; output goes on
