"""The monitor: one small process per running container, forked by `run` /
`start`. It is a child subreaper and runs `runtime create`, so the
container's init becomes its child once the runtime exits; it holds the
container's stdio (or its terminal, or the log of a detached one), passes on
the signals `run` forwards, records the exit status in state.json, and
cleans up after the container (runtime state, network helper, mount).

`run` in the foreground waits for the monitor, whose exit status is the
container's; a detached `run` returns once the monitor says it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from unionfs.container import network, record, tty
from unionfs.container.record import EXIT_ENGINE, EXIT_UNKNOWN, EngineError, RunConfig
from unionfs.container.runtime import Runtime, container_id, last_line
from unionfs.errors import UserError
from unionfs.image.store import Container, Store, mounted_paths
from unionfs.mount import umount

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


def launch(store: Store, c: Container, rc: RunConfig, rt: Runtime, bundle: str, attach: bool) -> int:
    """Fork the monitor of `c` and wait until the container runs (a failure
    to start is raised, with the monitor's exit code). attach: wait for the
    end too, passing signals on; return the container's exit status."""
    status_r, status_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EXIT_ENGINE
        try:
            os.close(status_r)
            os.close(ctl_w)
            code = _monitor(store, c, rc, rt, bundle, attach, status_w, ctl_r)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)
    os.close(status_w)
    os.close(ctl_r)

    def forward(signum, _frame):
        with contextlib.suppress(OSError):
            os.write(ctl_w, bytes([signum]))
    if attach:
        # From now on the container's: the monitor passes them on (or drops
        # them while there is no process yet).
        for s in FORWARDED_SIGNALS:
            signal.signal(s, forward)
    with os.fdopen(status_r, "rb") as f:
        status = f.read().decode(errors="replace")
    if not status.startswith("ok"):
        _, wstatus = os.waitpid(pid, 0)
        os.close(ctl_w)
        err = UserError(status.strip() or "the container's monitor failed")
        err.exit_code = os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else EXIT_ENGINE
        raise err
    if not attach:
        os.close(ctl_w)
        return 0
    _, wstatus = os.waitpid(pid, 0)
    os.close(ctl_w)
    return os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else EXIT_ENGINE


# -- the monitor -------------------------------------------------------------

def _set_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _exit_code(wstatus: int) -> int:
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code


def _monitor(store: Store, c: Container, rc: RunConfig, rt: Runtime, bundle: str, attach: bool,
             status_w: int, ctl_r: int) -> int:
    """The monitor (a forked child of run/start): see the module's doc."""
    cid = container_id(store.root, c.name)
    null = os.open(os.devnull, os.O_RDWR)
    if attach:
        stdin = 0 if rc.interactive else null
        out = 1
    else:
        os.setsid()
        log = os.open(record.log_path(c), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for fd in (0, 1, 2):
            os.dup2(null if fd == 0 else log, fd)
        stdin, out = null, 1
    _set_subreaper()
    container_pid = [0]

    def forward(signum, _frame=None):
        if container_pid[0]:
            with contextlib.suppress(OSError):
                os.kill(container_pid[0], signum)

    for s in FORWARDED_SIGNALS:
        # In the foreground the terminal's ^C / ^\ reach `run` and us alike
        # (the runtime puts the container in a session of its own): only
        # what `run` forwards is passed on, so the container gets each once.
        signal.signal(s, signal.SIG_IGN if attach and s in (signal.SIGINT, signal.SIGQUIT) else forward)

    def control():
        while True:
            b = os.read(ctl_r, 1)
            if not b:
                return
            forward(b[0])
    threading.Thread(target=control, daemon=True).start()

    st = record.read_state(c)
    st.monitor = record.identity(os.getpid())
    st.error = ""
    code = EXIT_ENGINE
    console = tty.ConsoleSocket() if rc.tty else None
    master = None
    try:
        pid_file = record.path(c, "container.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
        runtime_log = record.path(c, "runtime.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runtime_log)
        create = subprocess.Popen(
            rt.create_argv(cid, bundle, pid_file, runtime_log, console.path if console else None),
            stdin=null if console else stdin, stdout=null if console else out,
            stderr=subprocess.PIPE if console else 2)
        if console:
            master = console.receive(lambda: create.poll() is None)
        _, err = create.communicate(timeout=120)
        if create.returncode != 0 or (console and master is None):
            try:
                with open(runtime_log, errors="replace") as f:
                    why = f.read()
            except FileNotFoundError:
                why = (err or b"").decode(errors="replace")
            raise EngineError(f"{rt.name} create: {last_line(why)}")
        with open(pid_file) as f:
            container_pid[0] = int(f.read().strip())
        network.attach(rc.network, container_pid[0], rc.port_mappings(), record.path(c, "net"))
        rt.start(cid)
        st.status, st.pid, st.started, st.finished, st.exit_code = "running", container_pid[0], time.time(), 0.0, None
        record.write_state(c, st)
        os.write(status_w, b"ok\n")
        os.close(status_w)
        status_w = None

        result = {}

        def reap(block: bool) -> bool:
            while container_pid[0] not in result:
                try:
                    pid, wstatus = os.waitpid(-1, 0 if block else os.WNOHANG)
                except ChildProcessError:       # not ours after all: its status is lost
                    result.setdefault(container_pid[0], EXIT_UNKNOWN << 8)
                    break
                if pid == 0:
                    return False
                if pid == container_pid[0]:
                    result[pid] = wstatus
            return True

        if master is not None:
            if attach:
                tty.copy_winsize(0, master)
                signal.signal(signal.SIGWINCH, lambda *_: tty.copy_winsize(0, master))
            with tty.raw(0 if attach and rc.interactive else None):
                tty.proxy(master, 0 if attach and rc.interactive else None, out, lambda: reap(False))
        reap(True)
        code = _exit_code(result[container_pid[0]])
        st.exit_code = code
    except UserError as e:
        st.error = str(e)
        code = e.exit_code
        if status_w is not None:
            os.write(status_w, f"{e}\n".encode())
    except BaseException as e:
        st.error = f"internal error: {type(e).__name__}: {e}"
        if status_w is not None:
            os.write(status_w, f"{st.error}\n".encode())
        raise
    finally:
        if console:
            console.close()
        if master is not None:
            os.close(master)
        st.status = "exited" if st.started and st.status == "running" else st.status
        st.finished = time.time()
        if st.status == "exited" and st.exit_code is None:
            st.exit_code = code
        st.monitor = ""
        cleanup(store, c, rc, rt)
        record.write_state(c, st)
        if rc.auto_remove and st.status == "exited":
            with store.locked():
                store.remove_container(c)
    return code


def cleanup(store: Store, c: Container, rc: RunConfig, rt: Runtime):
    """Whatever a run leaves outside the container's directory: the runtime's
    state, the network helper, the mount. Safe to repeat, and after a crash."""
    rt.delete(container_id(store.root, c.name))
    # The helper may be gone already (a crash, a repeated clean-up): what
    # matters is that nothing of it is left, and the mount still goes.
    with contextlib.suppress(UserError, OSError):
        network.detach(record.path(c, "net"))
    unmount(c)


def unmount(c: Container):
    """Unmount `c`'s rootfs if it is mounted, waiting a little while the
    runtime's last processes let go of it."""
    mnt = record.rootfs_path(c)
    for _ in range(50):
        if mnt not in mounted_paths():
            return
        try:
            umount(mnt)
            return
        except UserError as e:
            if "busy" not in str(e):
                return      # a dead daemon's mount is removed with the error
        time.sleep(0.1)
