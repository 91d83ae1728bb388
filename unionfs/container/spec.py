"""The image config and `run`'s options -> the process and the runtime
bundle's config.json (OCI runtime spec 1.0), as docker would write them.

Pure functions: nothing here touches the rootfs or runs anything."""

from __future__ import annotations

import resource
from dataclasses import dataclass

from unionfs.container.users import ExecUser

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPS = tuple("CAP_" + c for c in (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"))

# runc's default spec (`runc spec`): hidden and read-only parts of /proc and /sys.
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# The engine's default open-files limit (podman's), lowered to what this
# process may set: a runtime cannot raise a hard limit without
# CAP_SYS_RESOURCE, which sandboxes often withhold.
DEFAULT_NOFILE = 1048576

# Mount points the runtime creates that are not in the image: they go into
# the container's init layer (see lifecycle.py), never into its upper.
SYSTEM_MOUNT_POINTS = ("/proc", "/sys", "/dev")
ETC_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")


@dataclass(frozen=True)
class Bind:
    source: str         # host path
    destination: str    # clean absolute path in the container
    readonly: bool = False


def process_args(image_config: dict, command: list[str], entrypoint: str | None) -> list[str]:
    """Entrypoint + Cmd as docker combines them: COMMAND replaces Cmd;
    --entrypoint replaces Entrypoint and drops the image's Cmd."""
    if entrypoint is not None:
        ep = [entrypoint] if entrypoint else []
        cmd = command
    else:
        ep = list(image_config.get("Entrypoint") or [])
        cmd = command or list(image_config.get("Cmd") or [])
    return ep + cmd


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """`base` overridden by `extra`, by variable name, keeping first-seen order."""
    out: dict[str, str] = {}
    for item in list(base) + list(extra):
        name = item.partition("=")[0]
        out[name] = item
    return list(out.values())


def process_env(image_config: dict, extra: list[str], hostname: str, home: str, tty: bool) -> list[str]:
    base = ["PATH=" + DEFAULT_PATH, f"HOSTNAME={hostname}"]
    env = merge_env(base, list(image_config.get("Env") or []))
    if tty:
        env = merge_env(env, ["TERM=xterm"])
    env = merge_env(env, extra)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={home}")
    return env


def rlimits() -> list[dict]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = DEFAULT_NOFILE if hard == resource.RLIM_INFINITY else min(DEFAULT_NOFILE, hard)
    return [{"type": "RLIMIT_NOFILE", "hard": n, "soft": n}]


def process(args: list[str], env: list[str], cwd: str, user: ExecUser, tty: bool) -> dict:
    caps = list(DEFAULT_CAPS)
    # As docker 20.10+ and podman: a non-root process starts without
    # effective or permitted capabilities (it could only use them via setuid).
    running_caps = caps if user.uid == 0 else []
    return {
        "terminal": tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": running_caps, "permitted": running_caps,
                         "inheritable": []},
        "rlimits": rlimits(),
        "noNewPrivileges": False,
    }


def _bind(dest: str, source: str, readonly: bool = False) -> dict:
    return {"destination": dest, "type": "bind", "source": source,
            "options": ["rbind", "rprivate"] + (["ro"] if readonly else [])}


def config(*, rootfs: str, proc: dict, hostname: str, readonly: bool, netns: bool,
           etc_files: dict[str, str], binds: list[Bind]) -> dict:
    """config.json for a container whose root is `rootfs` (already mounted).

    `etc_files` maps /etc/hosts, /etc/hostname, /etc/resolv.conf to the
    per-container files bind-mounted there."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        # sysfs shows the network namespace it is mounted in: in the host's
        # (--network host) only a bind of the host's /sys is allowed.
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]} if netns else
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    mounts += [_bind(dest, src) for dest, src in sorted(etc_files.items())]
    mounts += [_bind(b.destination, b.source, b.readonly) for b in binds]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if netns:
        namespaces.append({"type": "network"})
    return {
        "ociVersion": OCI_VERSION,
        "process": proc,
        "root": {"path": rootfs, "readonly": readonly},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
