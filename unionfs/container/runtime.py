"""The OCI runtime (runc, or crun where installed), driven through its
command line: create / start / state / kill / delete / pause / resume / exec.

Each store has its own runtime state directory (`--root STORE/runtime/NAME`):
the runtime's records live and die with the store's containers, `runc list`
of other users of the machine never shows them, and `rm -f` can always find
what it must delete. Container ids are unique on the machine anyway (a hash
of the store's path + the container's name), since the runtime names cgroups
after them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

from unionfs.errors import UserError

RUNTIMES = ("runc", "crun")
TIMEOUT = 60        # seconds any runtime command may take


def container_id(store_root: str, name: str) -> str:
    return f"unionfs-{hashlib.sha256(store_root.encode()).hexdigest()[:12]}-{name}"


class Runtime:
    def __init__(self, name: str, store_root: str):
        if name not in RUNTIMES:
            raise UserError(f"--runtime {name}: must be one of {', '.join(RUNTIMES)}")
        if os.geteuid() != 0:
            # A rootless runtime needs a user namespace and id mappings in
            # config.json, and a rootless network and cgroup set-up: not done.
            raise UserError("running containers needs root (rootless containers are not supported)")
        self.name = name
        self.binary = shutil.which(name)
        if self.binary is None:
            raise UserError(f"runtime {name} is not installed (apt-get install {name})")
        self.root = os.path.join(store_root, "runtime", name)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", self.root, *args]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self._argv(*args), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=TIMEOUT)
        if check and r.returncode != 0:
            raise UserError(f"{self.name} {args[0]}: {last_line(r.stderr)}")
        return r

    def create_argv(self, cid: str, bundle: str, pid_file: str, log: str,
                    console_socket: str | None) -> list[str]:
        """The `create` command line (run by the monitor, with the
        container's stdio as its own)."""
        argv = [self.binary, "--root", self.root, "--log", log, "--log-format", "json",
                "create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            argv += ["--console-socket", console_socket]
        return argv + [cid]

    def exec_argv(self, cid: str, process_file: str, console_socket: str | None) -> list[str]:
        argv = self._argv("exec", "--process", process_file)
        if console_socket:
            argv += ["--console-socket", console_socket]
        return argv + [cid]

    def start(self, cid: str):
        self._run("start", cid)

    def state(self, cid: str) -> dict | None:
        """The runtime's state of `cid` ({"status": "running"|"paused"|
        "stopped"|"created", "pid": ...}), or None if it has none."""
        if not os.path.isdir(self.root):
            return None
        r = self._run("state", cid, check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def kill(self, cid: str, signal: str = "TERM") -> bool:
        """Send `signal` to the container's init; False if it is not running."""
        return self._run("kill", cid, signal, check=False).returncode == 0

    def delete(self, cid: str):
        """Forget `cid` (killing what still runs); no error if it is unknown."""
        if os.path.isdir(self.root):
            self._run("delete", "--force", cid, check=False)

    def pause(self, cid: str):
        self._run("pause", cid)

    def resume(self, cid: str):
        self._run("resume", cid)


def last_line(text: str) -> str:
    """The last non-empty line of a runtime's stderr or JSON log, as a message."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if not lines:
        return "failed"
    line = lines[-1]
    try:
        rec = json.loads(line)
        return str(rec.get("msg", line))
    except ValueError:
        return line
