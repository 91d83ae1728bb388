"""A container's records beside its upper in the store, and the exit codes
and errors of running it.

A container made by `run` is a store container (upper/, work/) with more
in its directory:

    run.json        what `run` was asked for (RunConfig), to start it again
    state.json      created | running | exited, pids, times, exit code
    init/           the init layer: mount points of what is not in the image
    etc/            the container's hosts, hostname and resolv.conf
    volumes/KEY/    anonymous volumes (removed with the container)
    rootfs/         the unionfs mount: init/ + image layers under upper/
    bundle/         the runtime bundle (config.json)
    container.log   stdout+stderr of a detached container
    net/            the network helper's state
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from unionfs.container import network, spec
from unionfs.container.runtime import Runtime
from unionfs.errors import EXIT_ERROR, UserError
from unionfs.image.store import Container, Store, write_atomic
from unionfs.mount import _alive, _proc_start

# Exit codes as docker's.
EXIT_ENGINE = 125       # unionfs itself failed
EXIT_CANNOT_RUN = 126   # the command exists but cannot be run
EXIT_NOT_FOUND = 127    # the command is not there
EXIT_UNKNOWN = 255      # the container ended while nobody was watching

RUN_FILE = "run.json"
STATE_FILE = "state.json"
LOG_FILE = "container.log"
STOP_TIMEOUT = 10       # seconds between SIGTERM and SIGKILL


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
    env: list[str]                      # image Env, --env-file, -e (not HOME/HOSTNAME/TERM)
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

def path(c: Container, *parts: str) -> str:
    return os.path.join(c.path, *parts)


def is_run_container(c: Container) -> bool:
    return os.path.exists(path(c, RUN_FILE))


def run_config(c: Container) -> RunConfig:
    with open(path(c, RUN_FILE), "rb") as f:
        return RunConfig.from_json(json.load(f))


def read_state(c: Container) -> State:
    try:
        with open(path(c, STATE_FILE), "rb") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return State()
    names = {f.name for f in dataclasses.fields(State)}
    return State(**{k: v for k, v in rec.items() if k in names})


def write_state(c: Container, st: State):
    write_atomic(path(c, STATE_FILE), json.dumps(dataclasses.asdict(st), indent=1).encode())


def runtime_for(store: Store, rc: RunConfig) -> Runtime:
    return Runtime(rc.runtime, store.root)


def rootfs_path(c: Container) -> str:
    return path(c, "rootfs")


def log_path(c: Container) -> str:
    return path(c, LOG_FILE)


def volume_key(ctr_path: str) -> str:
    """The name of the anonymous volume at `ctr_path` under volumes/."""
    return hashlib.sha256(ctr_path.encode()).hexdigest()[:16]


# -- processes ---------------------------------------------------------------

def identity(pid: int) -> str:
    return f"{pid} {_proc_start(pid)}"


def monitor_alive(st: State) -> bool:
    """True while the monitor recorded in `st` runs (not a later process
    that got its pid, not a zombie)."""
    if not st.monitor:
        return False
    pid, _, start = st.monitor.partition(" ")
    return _proc_start(int(pid)) == start and _alive(int(pid))


def wait_gone(st: State, timeout: float) -> bool:
    """Wait until the monitor in `st` has exited; False if it still runs
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while monitor_alive(st):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
