"""A container's life: create (record, init layer, volumes), start (mount,
bundle, monitor), stop, exec, remove, commit's pause, ps's status, and
reconciling our records with the runtime's after a crash.

The init layer sits between the image's layers and the upper, so the mount
points the runtime needs (/proc, /sys, /dev, the /etc files, volumes) exist
in the container's view without ever being in the upper: `diff` and `commit`
compare the upper with the image's layers alone.

A container whose monitor died shows `Exited (255)` once the runtime says it
is gone, as docker shows a container whose exit it missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import tempfile
import time

from unionfs.container import monitor, network, record, rootfs, spec, tty, users
from unionfs.container.record import (EXIT_ENGINE, EXIT_UNKNOWN, STOP_TIMEOUT, CannotRun, EngineError, NotFound,
                                      RunConfig, State)
from unionfs.container.runtime import container_id, last_line
from unionfs.errors import UserError
from unionfs.image.commands import mount_container
from unionfs.image.store import Container, Image, Store, mounted_paths, rmtree, write_atomic


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


def create(store: Store, image: Image, name: str, rc: RunConfig, ref: str | None = None) -> Container:
    """The container record and everything beside it that does not need the
    rootfs mounted (`ref`: the image's name as the user gave it, for `ps`).
    Leaves nothing behind on failure."""
    with store.locked():
        c = store.create_container(name, image, ref)
    try:
        write_atomic(record.path(c, record.RUN_FILE), json.dumps(dataclasses.asdict(rc), indent=1).encode())
        record.write_state(c, State())
        os.mkdir(record.rootfs_path(c), 0o755)
        for d in ("etc", "volumes", "bundle", "net"):
            os.mkdir(record.path(c, d), 0o700)
        file_binds = [b.destination for b in rc.bind_list() if not os.path.isdir(b.source)]
        dir_binds = [b.destination for b in rc.bind_list() if os.path.isdir(b.source)]
        build_init_layer(record.path(c, "init"), store.lowerdirs(image),
                         list(spec.SYSTEM_MOUNT_POINTS) + rc.volumes + dir_binds,
                         list(spec.ETC_FILES) + file_binds)
    except BaseException:
        with store.locked():
            store.remove_container(c)
        raise
    return c


# -- start -------------------------------------------------------------------

def _mount(store: Store, c: Container):
    mnt = record.rootfs_path(c)
    if mnt in mounted_paths():
        return
    if c.mountpoint != mnt:
        c.mountpoint = mnt
        with store.locked():
            store.write_container(c)
    # Device nodes and setuid programs of the image work as in any container.
    options = {"dev": True, "suid": True} if os.geteuid() == 0 else {}
    mount_container(c, [record.path(c, "init")] + store.lowerdirs(store.image(c.image)), mnt, options)


def _fill_volumes(c: Container, rc: RunConfig):
    """Each anonymous volume, the first time: a copy of what the image has there."""
    root = record.rootfs_path(c)
    for path in rc.volumes:
        final = record.path(c, "volumes", record.volume_key(path))
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
        path = record.path(c, "etc", os.path.basename(dest))
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
             cwd: str, tty_: bool, make_cwd: bool) -> dict:
    """The runtime's `process` for `args` in `c`: user, environment and
    command checked against the mounted rootfs. make_cwd: create the working
    dir if missing (run's WorkingDir / -w), else it must exist (exec -w)."""
    root = record.rootfs_path(c)
    try:
        user = users.resolve_in(root, user_spec)
    except UserError as e:
        raise EngineError(str(e)) from None
    env = spec.process_env({"Env": rc.env}, extra_env, rc.hostname, user.home, tty_)
    if make_cwd and not rc.read_only:
        try:
            rootfs.mkdir_all(root, cwd)     # here, where the image's links stay inside it
        except OSError as e:
            raise EngineError(f"working directory {cwd}: {e.strerror}") from None
    elif not make_cwd:
        st = rootfs.stat_in(root, cwd)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise EngineError(f"working directory {cwd}: no such directory in the container")
    check_command(root, args, env, cwd)
    return spec.process(args, env, cwd, user, tty_)


def _bundle(c: Container, rc: RunConfig) -> str:
    etc = _write_etc(c, rc)
    binds = rc.bind_list() + [spec.Bind(record.path(c, "volumes", record.volume_key(v)), v) for v in rc.volumes]
    proc = _process(c, rc, rc.user, rc.args, [], rc.cwd, rc.tty, make_cwd=True)
    cfg = spec.config(rootfs=record.rootfs_path(c), proc=proc, hostname=rc.hostname, readonly=rc.read_only,
                      netns=network.needs_netns(rc.network), etc_files=etc, binds=binds)
    bundle = record.path(c, "bundle")
    write_atomic(os.path.join(bundle, "config.json"), json.dumps(cfg, indent=1).encode())
    return bundle


def start(store: Store, c: Container, attach: bool) -> int:
    """Start `c` (created or exited). attach: the caller's stdio are the
    container's and the return value is its exit status; else its output goes
    to the log and this returns 0 once it runs."""
    st = refresh(store, c)
    if st.status == "running":
        raise EngineError(f"container {c.name} is already running")
    rc = record.run_config(c)
    rt = record.runtime_for(store, rc)
    rt.delete(container_id(store.root, c.name))     # what a crash may have left
    _mount(store, c)
    try:
        _fill_volumes(c, rc)
        bundle = _bundle(c, rc)
    except BaseException:
        monitor.unmount(c)
        raise
    return monitor.launch(store, c, rc, rt, bundle, attach)


# -- reconciling, stop, remove -------------------------------------------------

def refresh(store: Store, c: Container) -> State:
    """`c`'s state, reconciled with the runtime's when its monitor is gone:
    a container nobody watched end is `exited` (255) and cleaned up."""
    st = record.read_state(c)
    if st.status != "running" or record.monitor_alive(st):
        return st
    rc = record.run_config(c)
    rt = record.runtime_for(store, rc)
    rs = rt.state(container_id(store.root, c.name))
    if rs is not None and rs.get("status") in ("running", "paused", "created"):
        return st       # it runs on, unwatched: `stop` / `rm -f` will end it
    st.status, st.exit_code, st.finished, st.monitor = "exited", EXIT_UNKNOWN, time.time(), ""
    monitor.cleanup(store, c, rc, rt)
    record.write_state(c, st)
    return st


def stop(store: Store, c: Container, timeout: float = STOP_TIMEOUT):
    st = refresh(store, c)
    if st.status != "running":
        return
    rc = record.run_config(c)
    rt = record.runtime_for(store, rc)
    cid = container_id(store.root, c.name)
    if (rt.state(cid) or {}).get("status") == "paused":
        rt.resume(cid)
    rt.kill(cid, "TERM")
    if not record.wait_gone(st, timeout):
        rt.kill(cid, "KILL")
        record.wait_gone(st, 30)
    if not st.monitor or not record.monitor_alive(st):
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
    rc = record.run_config(c)
    monitor.cleanup(store, c, rc, record.runtime_for(store, rc))
    with store.locked():
        store.remove_container(c)


@contextlib.contextmanager
def paused(store: Store, c: Container, pause: bool):
    """`c` frozen by the runtime meanwhile, if it runs and `pause`."""
    if not (pause and record.is_run_container(c) and refresh(store, c).status == "running"):
        yield
        return
    rt = record.runtime_for(store, record.run_config(c))
    cid = container_id(store.root, c.name)
    rt.pause(cid)
    try:
        yield
    finally:
        rt.resume(cid)


def running_status(store: Store, c: Container) -> str:
    """The runtime's status of a running container: running or paused."""
    rt = record.runtime_for(store, record.run_config(c))
    return (rt.state(container_id(store.root, c.name)) or {}).get("status", "running")


# -- exec --------------------------------------------------------------------

def exec_(store: Store, c: Container, args: list[str], env: list[str], cwd: str | None,
          user: str | None, interactive: bool, tty_: bool) -> int:
    st = refresh(store, c)
    if st.status != "running":
        raise EngineError(f"container {c.name} is not running")
    rc = record.run_config(c)
    rt = record.runtime_for(store, rc)
    with open(record.path(c, "bundle", "config.json"), "rb") as f:
        base = json.load(f)["process"]
    # The container's environment as it was started (HOME and TERM follow
    # exec's own user and terminal), then exec's -e.
    exec_rc = dataclasses.replace(rc, env=[e for e in base["env"] if not e.startswith(("HOME=", "TERM="))])
    proc = _process(c, exec_rc, user if user is not None else rc.user, args, env, cwd or base["cwd"], tty_,
                    make_cwd=False)
    fd, process_file = tempfile.mkstemp(dir=record.path(c, "bundle"), prefix="exec-", suffix=".json")
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
    if not record.is_run_container(c):
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
    if not record.is_run_container(c):
        return '""'
    text = " ".join(record.run_config(c).args)
    return f'"{text[:width - 1]}…"' if len(text) > width else f'"{text}"'
