"""`commit -c`: Dockerfile-style instructions applied to an image's config
(CMD ENTRYPOINT ENV WORKDIR USER EXPOSE VOLUME LABEL), as `docker commit
--change` does."""

from __future__ import annotations

import copy
import json
import shlex

from unionfs.errors import UserError

INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "EXPOSE", "VOLUME", "LABEL")


def _exec_form(unsafe: str) -> list[str] | None:
    """["a", "b"] -> list, or None if `unsafe` is not a JSON string array."""
    if not unsafe.startswith("["):
        return None
    try:
        value = json.loads(unsafe)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _command(unsafe: str) -> list[str]:
    form = _exec_form(unsafe)
    return form if form is not None else ["/bin/sh", "-c", unsafe]


def _pairs(instruction: str, unsafe: str) -> list[tuple[str, str]]:
    """KEY=VALUE ... (shell quoting), or the legacy `KEY VALUE` form."""
    try:
        words = shlex.split(unsafe)
    except ValueError as e:
        raise UserError(f"-c {instruction} {unsafe}: {e}") from None
    if words and "=" not in words[0]:
        key, _, value = unsafe.partition(" ")
        return [(key, value.strip())]
    out = []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise UserError(f"-c {instruction} {unsafe}: expected KEY=VALUE, got {w!r}")
        out.append((key, value))
    return out


def apply_changes(image_config: dict, changes: list[str]) -> dict:
    """A copy of the image config (`config` section of the image) with
    `changes` applied in order."""
    cfg = copy.deepcopy(image_config)
    for change in changes:
        instruction, _, unsafe = change.strip().partition(" ")
        instruction, unsafe = instruction.upper(), unsafe.strip()
        if instruction not in INSTRUCTIONS:
            raise UserError(f"-c {change!r}: unknown instruction (one of {', '.join(INSTRUCTIONS)})")
        if not unsafe:
            raise UserError(f"-c {change!r}: {instruction} needs an argument")
        if instruction == "CMD":
            cfg["Cmd"] = _command(unsafe)
        elif instruction == "ENTRYPOINT":
            cfg["Entrypoint"] = _command(unsafe)
        elif instruction == "ENV":
            env = list(cfg.get("Env") or [])
            for key, value in _pairs(instruction, unsafe):
                env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
            cfg["Env"] = env
        elif instruction == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            labels.update(_pairs(instruction, unsafe))
            cfg["Labels"] = labels
        elif instruction == "WORKDIR":
            cfg["WorkingDir"] = unsafe
        elif instruction == "USER":
            cfg["User"] = unsafe
        elif instruction == "EXPOSE":
            ports = dict(cfg.get("ExposedPorts") or {})
            for p in unsafe.split():
                port, _, proto = p.partition("/")
                if not port.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
                    raise UserError(f"-c {change!r}: {p!r} is not PORT[/PROTO]")
                ports[f"{port}/{proto or 'tcp'}"] = {}
            cfg["ExposedPorts"] = ports
        elif instruction == "VOLUME":
            paths = _exec_form(unsafe) or unsafe.split()
            volumes = dict(cfg.get("Volumes") or {})
            volumes.update({p: {} for p in paths})
            cfg["Volumes"] = volumes
    return cfg
