"""A container's life: create (record, init layer, volumes), start (mount,
bundle, monitor, runtime), stop, exec, remove, and reconciling our records
with the runtime's after a crash.

A container made by `run` is a store container (upper/, work/) with more
beside it in its directory:

    run.json        what `run` was asked for (RunConfig), to start it again
    state.json      created | running | exited, pids, times, exit code
    init/           the init layer: mount points of what is not in the image
    etc/            the container's hosts, hostname and resolv.conf
    volumes/KEY/    anonymous volumes (removed with the container)
    rootfs/         the unionfs mount: init/ + image layers under upper/
    bundle/         the runtime bundle (config.json)
    container.log   stdout+stderr of a detached container
    net/            the network helper's state

The init layer sits between the image's layers and the upper, so the mount
points the runtime needs (/proc, /sys, /dev, the /etc files, volumes) exist
in the container's view without ever being in the upper: `diff` and `commit`
compare the upper with the image's layers alone.

One monitor process per running container (forked by `run`/`start`) is a
child subreaper: it runs `runtime create`, so the container's init becomes
its child when the runtime exits; it holds the container's stdio (or the
log), records the exit status in state.json, and cleans up (runtime state,
network helper, mount). A container whose monitor died shows `Exited (255)`
once the runtime says it is gone, as docker shows a container whose exit it
missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

from unionfs.container import network, rootfs, spec, tty, users
from unionfs.container.runtime import Runtime, container_id, last_line
from unionfs.errors import EXIT_ERROR, UserError
from unionfs.image.commands import mount_container
from unionfs.image.store import Container, Image, Store, mounted_paths, rmtree, write_atomic
from unionfs.mount import _alive, _proc_start, umount

# Exit codes as docker's.
EXIT_ENGINE = 125       # unionfs itself failed
EXIT_CANNOT_RUN = 126   # the command exists but cannot be run
EXIT_NOT_FOUND = 127    # the command is not there
EXIT_UNKNOWN = 255      # the container ended while nobody was watching

RUN_FILE = "run.json"
STATE_FILE = "state.json"
LOG_FILE = "container.log"
STOP_TIMEOUT = 10       # seconds between SIGTERM and SIGKILL
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


class EngineError(UserError):
    """unionfs could not run the container (docker's 125)."""
    exit_code = EXIT_ENGINE


class CannotRun(UserError):
    exit_code = EXIT_CANNOT_RUN


class NotFound(UserError):
    exit_code = EXIT_NOT_FOUND


def engine_error(e: UserError) -> UserError:
    """`e`, with docker's exit code (125) unless it has a more specific one."""
    if e.exit_code == EXIT_ERROR:
        e.exit_code = EXIT_ENGINE
    return e


@dataclass
class RunConfig:
    """What `run` was asked for; kept in run.json so `start` can redo it."""
    args: list[str]
    env: list[str]                      # image Env + -e, without HOME/HOSTNAME/TERM
    cwd: str
    user: str                           # USER[:GROUP] as given (resolved at each start)
    hostname: str
    network: str = "private"
    ports: list[dict] = field(default_factory=list)
    read_only: bool = False
    runtime: str = "runc"
    tty: bool = False
    interactive: bool = False
    auto_remove: bool = False
    binds: list[dict] = field(default_factory=list)     # -v HOST:CTR[:ro]
    volumes: list[str] = field(default_factory=list)    # anonymous volume paths in the container

    @classmethod
    def from_json(cls, rec: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in rec.items() if k in names})

    def port_mappings(self) -> list[network.PortMapping]:
        return [network.PortMapping(**p) for p in self.ports]

    def bind_list(self) -> list[spec.Bind]:
        return [spec.Bind(**b) for b in self.binds]


@dataclass
class State:
    status: str = "created"             # created | running | exited
    pid: int = 0                        # the container's init, in our pid namespace
    monitor: str = ""                   # "PID STARTTIME" of the monitor
    started: float = 0.0
    finished: float = 0.0
    exit_code: int | None = None
    error: str = ""


# -- paths and records ---------------------------------------------------------

def _p(c: Container, *parts: str) -> str:
    return os.path.join(c.path, *parts)


def is_run_container(c: Container) -> bool:
    return os.path.exists(_p(c, RUN_FILE))


def run_config(c: Container) -> RunConfig:
    with open(_p(c, RUN_FILE), "rb") as f:
        return RunConfig.from_json(json.load(f))


def read_state(c: Container) -> State:
    try:
        with open(_p(c, STATE_FILE), "rb") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return State()
    names = {f.name for f in dataclasses.fields(State)}
    return State(**{k: v for k, v in rec.items() if k in names})


def write_state(c: Container, st: State):
    write_atomic(_p(c, STATE_FILE), json.dumps(dataclasses.asdict(st), indent=1).encode())


def runtime_for(store: Store, rc: RunConfig) -> Runtime:
    return Runtime(rc.runtime, store.root)


def rootfs_path(c: Container) -> str:
    return _p(c, "rootfs")


def log_path(c: Container) -> str:
    return _p(c, LOG_FILE)


def volume_key(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:16]


# -- processes ---------------------------------------------------------------

def _identity(pid: int) -> str:
    return f"{pid} {_proc_start(pid)}"


def monitor_alive(st: State) -> bool:
    """True while the monitor recorded in `st` runs (not a later process
    that got its pid, not a zombie)."""
    if not st.monitor:
        return False
    pid, _, start = st.monitor.partition(" ")
    return _proc_start(int(pid)) == start and _alive(int(pid))


def _wait_gone(st: State, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while monitor_alive(st):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- create ------------------------------------------------------------------

def _copy_meta(st: os.stat_result | None, path: str):
    if st is None:
        return
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, st.st_mode & 0o7777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _image_stat(lowerdirs: list[str], path: str) -> os.stat_result | None:
    """The metadata of `path` in the top-most image layer that has it, a
    layer walked without following any symlink."""
    for layer in lowerdirs:
        st = rootfs.stat_in(layer, path, follow=False)
        if st is not None:
            return st
    return None


def build_init_layer(init: str, lowerdirs: list[str], dirs: list[str], files: list[str]):
    """Make `dirs` and (empty) `files` in the init layer `init`, each parent
    directory with the metadata it has in the image (so the init layer's
    copy, which wins in the union, changes nothing the container sees)."""
    os.makedirs(init, exist_ok=True)
    made = {"/"}
    dir_meta = []

    def mkdir(path):
        if path in made:
            return
        mkdir(os.path.dirname(path))
        made.add(path)
        os.mkdir(init + path, 0o755)
        st = _image_stat(lowerdirs, path)
        dir_meta.append((init + path, st if st is not None and stat.S_ISDIR(st.st_mode) else None))

    for d in dirs:
        mkdir(d)
    for f in files:
        if f in made:
            continue
        mkdir(os.path.dirname(f))
        made.add(f)
        fd = os.open(init + f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
    for path, st in reversed(dir_meta):     # children first: their mtimes change the parent's
        _copy_meta(st, path)


def create(store: Store, image: Image, name: str, rc: RunConfig) -> Container:
    """The container record and everything beside it that does not need the
    rootfs mounted. Leaves nothing behind on failure."""
    with store.locked():
        c = store.create_container(name, image)
    try:
        write_atomic(_p(c, RUN_FILE), json.dumps(dataclasses.asdict(rc), indent=1).encode())
        write_state(c, State())
        os.mkdir(rootfs_path(c), 0o755)
        for d in ("etc", "volumes", "bundle", "net"):
            os.mkdir(_p(c, d), 0o700)
        file_binds = [b.destination for b in rc.bind_list() if not os.path.isdir(b.source)]
        dir_binds = [b.destination for b in rc.bind_list() if os.path.isdir(b.source)]
        build_init_layer(_p(c, "init"), store.lowerdirs(image),
                         list(spec.SYSTEM_MOUNT_POINTS) + rc.volumes + dir_binds,
                         list(spec.ETC_FILES) + file_binds)
    except BaseException:
        with store.locked():
            store.remove_container(c)
        raise
    return c


# -- start -------------------------------------------------------------------

def _mount(store: Store, c: Container):
    mnt = rootfs_path(c)
    if mnt in mounted_paths():
        return
    if c.mountpoint != mnt:
        c.mountpoint = mnt
        with store.locked():
            store.write_container(c)
    # Device nodes and setuid programs of the image work as in any container.
    options = {"dev": True, "suid": True} if os.geteuid() == 0 else {}
    mount_container(c, [_p(c, "init")] + store.lowerdirs(store.image(c.image)), mnt, options)


def _umount(c: Container):
    mnt = rootfs_path(c)
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


def _fill_volumes(c: Container, rc: RunConfig):
    """Each anonymous volume, the first time: a copy of what the image has there."""
    root = rootfs_path(c)
    for path in rc.volumes:
        final = _p(c, "volumes", volume_key(path))
        if os.path.isdir(final):
            continue
        tmp = final + ".tmp"
        rmtree(tmp)
        os.mkdir(tmp, 0o755)
        try:
            fd = rootfs.open_in(root, path, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            fd = None                   # nothing there (or not a directory): an empty volume
        if fd is not None:
            try:
                _copy_meta(os.fstat(fd), tmp)
                r = subprocess.run(["cp", "-a", "--", f"/proc/self/fd/{fd}/.", tmp + "/"], pass_fds=(fd,),
                                   capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    raise EngineError(f"volume {path}: copying the image's content failed: "
                                      f"{last_line(r.stderr)}")
            finally:
                os.close(fd)
        os.rename(tmp, final)


def _write_etc(c: Container, rc: RunConfig) -> dict[str, str]:
    files = {
        "/etc/hostname": rc.hostname + "\n",
        "/etc/hosts": network.hosts(rc.network, rc.hostname),
        "/etc/resolv.conf": network.resolv_conf(rc.network),
    }
    out = {}
    for dest, text in files.items():
        path = _p(c, "etc", os.path.basename(dest))
        write_atomic(path, text.encode())
        os.chmod(path, 0o644)
        out[dest] = path
    return out


def check_command(root: str, args: list[str], env: list[str], cwd: str):
    """Refuse, as docker does (127 / 126), a command that is not in the
    container or cannot be executed -- before anything starts."""
    if not args:
        raise EngineError("no command: the image has no Cmd or Entrypoint, and none was given")
    cmd = args[0]
    if "/" in cmd:
        candidates = [cmd if cmd.startswith("/") else os.path.join(cwd, cmd)]
    else:
        path = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), spec.DEFAULT_PATH)
        candidates = [os.path.join(d or ".", cmd) for d in path.split(":")]
        candidates = [p if p.startswith("/") else os.path.join(cwd, p) for p in candidates]
    found_not_exec = None
    for candidate in candidates:
        st = rootfs.stat_in(root, candidate)
        if st is None:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return
        found_not_exec = found_not_exec or candidate
    if found_not_exec:
        raise CannotRun(f"{cmd}: permission denied (not an executable file)")
    raise NotFound(f"{cmd}: executable file not found in $PATH" if "/" not in cmd
                   else f"{cmd}: no such file or directory")


def _process(c: Container, rc: RunConfig, user_spec: str, args: list[str], extra_env: list[str],
             cwd: str, tty_: bool) -> dict:
    root = rootfs_path(c)
    try:
        user = users.resolve_in(root, user_spec)
    except UserError as e:
        raise EngineError(str(e)) from None
    env = spec.process_env({"Env": rc.env}, extra_env, rc.hostname, user.home, tty_)
    if not rc.read_only:
        try:
            rootfs.mkdir_all(root, cwd)     # here, where the image's links stay inside it
        except OSError as e:
            raise EngineError(f"working directory {cwd}: {e.strerror}") from None
    check_command(root, args, env, cwd)
    return spec.process(args, env, cwd, user, tty_)


def _bundle(c: Container, rc: RunConfig) -> str:
    etc = _write_etc(c, rc)
    binds = rc.bind_list() + [spec.Bind(_p(c, "volumes", volume_key(v)), v) for v in rc.volumes]
    proc = _process(c, rc, rc.user, rc.args, [], rc.cwd, rc.tty)
    cfg = spec.config(rootfs=rootfs_path(c), proc=proc, hostname=rc.hostname, readonly=rc.read_only,
                      netns=network.needs_netns(rc.network), etc_files=etc, binds=binds)
    bundle = _p(c, "bundle")
    write_atomic(os.path.join(bundle, "config.json"), json.dumps(cfg, indent=1).encode())
    return bundle


def start(store: Store, c: Container, attach: bool) -> int:
    """Start `c` (created or exited). attach: the caller's stdio are the
    container's and the return value is its exit status; else its output goes
    to the log and this returns 0 once it runs."""
    st = refresh(store, c)
    if st.status == "running":
        raise EngineError(f"container {c.name} is already running")
    rc = run_config(c)
    rt = runtime_for(store, rc)
    rt.delete(container_id(store.root, c.name))     # what a crash may have left
    _mount(store, c)
    try:
        _fill_volumes(c, rc)
        bundle = _bundle(c, rc)
    except BaseException:
        _umount(c)
        raise
    return _launch(store, c, rc, rt, bundle, attach)


def _launch(store, c, rc, rt, bundle, attach) -> int:
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


def _monitor(store, c, rc, rt, bundle, attach, status_w, ctl_r) -> int:
    """The monitor (a forked child of run/start): see the module's doc."""
    cid = container_id(store.root, c.name)
    null = os.open(os.devnull, os.O_RDWR)
    if attach:
        stdin = 0 if rc.interactive else null
        out = 1
    else:
        os.setsid()
        log = os.open(log_path(c), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        # In the foreground, the terminal's ^C / ^\ also reach us: only what
        # `run` forwards counts (the container's own process got it too).
        signal.signal(s, signal.SIG_IGN if attach and s in (signal.SIGINT, signal.SIGQUIT) else forward)

    def control():
        while True:
            b = os.read(ctl_r, 1)
            if not b:
                return
            forward(b[0])
    threading.Thread(target=control, daemon=True).start()

    st = read_state(c)
    st.monitor = _identity(os.getpid())
    st.error = ""
    code = EXIT_ENGINE
    console = tty.ConsoleSocket() if rc.tty else None
    master = None
    try:
        pid_file = _p(c, "container.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
        runtime_log = _p(c, "runtime.log")
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
            log = open(runtime_log, errors="replace").read() if os.path.exists(runtime_log) else ""
            raise EngineError(f"{rt.name} create: {last_line(log or (err or b'').decode(errors='replace'))}")
        with open(pid_file) as f:
            container_pid[0] = int(f.read().strip())
        network.attach(rc.network, container_pid[0], rc.port_mappings(), _p(c, "net"))
        rt.start(cid)
        st.status, st.pid, st.started, st.finished, st.exit_code = "running", container_pid[0], time.time(), 0.0, None
        write_state(c, st)
        os.write(status_w, b"ok\n")
        os.close(status_w)
        status_w = None

        result = {}

        def reap(block: bool) -> bool:
            while container_pid[0] not in result:
                try:
                    pid, wstatus = os.waitpid(-1, 0 if block else os.WNOHANG)
                except ChildProcessError:
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
        _cleanup(store, c, rc, rt)
        write_state(c, st)
        if rc.auto_remove and st.status == "exited":
            with store.locked():
                store.remove_container(c)
    return code


def _cleanup(store: Store, c: Container, rc: RunConfig, rt: Runtime):
    """Whatever a run leaves outside the container's directory: the runtime's
    state, the network helper, the mount. Safe to repeat, and after a crash."""
    rt.delete(container_id(store.root, c.name))
    with contextlib.suppress(Exception):
        network.detach(_p(c, "net"))
    _umount(c)


# -- reconciling, stop, remove -------------------------------------------------

def refresh(store: Store, c: Container) -> State:
    """`c`'s state, reconciled with the runtime's when its monitor is gone:
    a container nobody watched end is `exited` (255) and cleaned up."""
    st = read_state(c)
    if st.status != "running" or monitor_alive(st):
        return st
    rc = run_config(c)
    rt = runtime_for(store, rc)
    rs = rt.state(container_id(store.root, c.name))
    if rs is not None and rs.get("status") in ("running", "paused", "created"):
        return st       # it runs on, unwatched: `stop` / `rm -f` will end it
    st.status, st.exit_code, st.finished, st.monitor = "exited", EXIT_UNKNOWN, time.time(), ""
    _cleanup(store, c, rc, rt)
    write_state(c, st)
    return st


def stop(store: Store, c: Container, timeout: float = STOP_TIMEOUT):
    st = refresh(store, c)
    if st.status != "running":
        return
    rc = run_config(c)
    rt = runtime_for(store, rc)
    cid = container_id(store.root, c.name)
    if (rt.state(cid) or {}).get("status") == "paused":
        rt.resume(cid)
    rt.kill(cid, "TERM")
    if not _wait_gone(st, timeout):
        rt.kill(cid, "KILL")
        _wait_gone(st, 30)
    if not st.monitor or not monitor_alive(st):
        # An unwatched container: nobody else will clean up after it.
        deadline = time.monotonic() + 10
        while (rt.state(cid) or {}).get("status") == "running" and time.monotonic() < deadline:
            rt.kill(cid, "KILL")
            time.sleep(0.05)
        refresh(store, c)


def remove(store: Store, c: Container, force: bool):
    """Remove a run container: stopped first with -f; runtime state, network
    helper, mount and volumes always go."""
    st = refresh(store, c)
    if st.status == "running":
        if not force:
            raise EngineError(f"container {c.name} is running (stop it first, or rm -f)")
        stop(store, c, timeout=0)
    rc = run_config(c)
    _cleanup(store, c, rc, runtime_for(store, rc))
    with store.locked():
        store.remove_container(c)


@contextlib.contextmanager
def paused(store: Store, c: Container, pause: bool):
    """`c` frozen by the runtime meanwhile, if it runs and `pause`."""
    if not (pause and is_run_container(c) and refresh(store, c).status == "running"):
        yield
        return
    rt = runtime_for(store, run_config(c))
    cid = container_id(store.root, c.name)
    rt.pause(cid)
    try:
        yield
    finally:
        rt.resume(cid)


def running_status(store: Store, c: Container) -> str:
    """The runtime's status of a running container: running or paused."""
    rt = runtime_for(store, run_config(c))
    return (rt.state(container_id(store.root, c.name)) or {}).get("status", "running")


# -- exec --------------------------------------------------------------------

def exec_(store: Store, c: Container, args: list[str], env: list[str], cwd: str | None,
          user: str | None, interactive: bool, tty_: bool) -> int:
    st = refresh(store, c)
    if st.status != "running":
        raise EngineError(f"container {c.name} is not running")
    rc = run_config(c)
    rt = runtime_for(store, rc)
    with open(_p(c, "bundle", "config.json"), "rb") as f:
        base = json.load(f)["process"]
    proc = _process(c, RunConfig.from_json({**dataclasses.asdict(rc), "env": [
        e for e in base["env"] if not e.startswith(("HOME=", "TERM="))]}),
        user if user is not None else rc.user, args, env, cwd or base["cwd"], tty_)
    fd, process_file = tempfile.mkstemp(dir=_p(c, "bundle"), prefix="exec-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(proc, f)
    console = tty.ConsoleSocket() if tty_ else None
    try:
        cid = container_id(store.root, c.name)
        argv = rt.exec_argv(cid, process_file, console.path if console else None)
        if console is None:
            return subprocess.run(argv, stdin=None if interactive else subprocess.DEVNULL).returncode
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        master = console.receive(lambda: p.poll() is None)
        if master is None:
            return p.wait() or EXIT_ENGINE
        try:
            tty.copy_winsize(0, master)
            with tty.raw(0 if interactive else None):
                tty.proxy(master, 0 if interactive else None, 1, lambda: p.poll() is not None)
        finally:
            os.close(master)
        return p.wait()
    finally:
        if console:
            console.close()
        os.unlink(process_file)


# -- ps ----------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """docker's go-units HumanDuration: "3 seconds", "About a minute", "5 hours"."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def status_text(store: Store, c: Container, mounted: set[str]) -> tuple[str, bool]:
    """ps's STATUS of `c`, and whether it is live (shown without -a)."""
    if not is_run_container(c):
        if c.mountpoint and c.mountpoint in mounted:
            return "Mounted", True
        return "Unmounted", False
    st = refresh(store, c)
    now = time.time()
    if st.status == "running":
        paused_ = " (Paused)" if running_status(store, c) == "paused" else ""
        return f"Up {human_duration(now - st.started)}{paused_}", True
    if st.status == "exited":
        return f"Exited ({st.exit_code}) {human_duration(now - st.finished)} ago", False
    return "Created", False


def command_text(c: Container, width: int = 20) -> str:
    """ps's COMMAND: the process's command line, quoted and shortened."""
    if not is_run_container(c):
        return '""'
    text = " ".join(run_config(c).args)
    return f'"{text[:width - 1]}…"' if len(text) > width else f'"{text}"'
