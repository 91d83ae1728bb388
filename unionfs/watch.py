"""`unionfs which`, `unionfs events`, `unionfs stats`: watch copy-on-write
happen (DESIGN.md §8). The client side of control.py's socket.

A mount is named by its mount point or, for an image container, by the
container's name in the image store. `which` finds the mount that holds
each path it is given.
"""

import argparse
import json
import os
import re
import sys
import time

from unionfs import control, observe
from unionfs.errors import EXIT_ERROR, EXIT_OK, UserError


def register(subparsers):
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR",
                       help="image store, for a container NAME (default: as `unionfs image`)")

    p = subparsers.add_parser("which", help="which layer provides each merged path")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per path")
    p.set_defaults(func=cmd_which)

    p = subparsers.add_parser("events", parents=[store],
                              help="copy-ups, whiteouts and opaque directories as they happen")
    p.add_argument("target", metavar="MOUNTPOINT|NAME")
    p.add_argument("-f", "--follow", action="store_true",
                   help="after the recent events, print new ones until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = subparsers.add_parser("stats", parents=[store],
                              help="request latencies, copy-up and whiteout counters, daemon RSS/CPU")
    p.add_argument("target", metavar="MOUNTPOINT|NAME")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--watch", action="store_true", help="refresh in place every second (a terminal)")
    p.set_defaults(func=cmd_stats)


# -- finding the mount ---------------------------------------------------------------

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _mounts():
    """(mount point, fstype) of every mount, in /proc/self/mountinfo order."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            mnt = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
            fstype = fields[fields.index(b"-") + 1]
            out.append((os.fsdecode(mnt), os.fsdecode(fstype)))
    return out


def _socket_of(mountpoint):
    """The control socket of unionfs mount ``mountpoint``, or None."""
    from unionfs.mount import pidfile_for
    path = control.socket_for(pidfile_for(mountpoint))
    return path if os.path.exists(path) else None


def _mount_holding(real):
    """The mount point of the mount that holds real path ``real`` (the last
    mounted on the deepest directory above it), and its fstype."""
    best = ("/", "")
    for mnt, fstype in _mounts():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best


def resolve_target(target, store_dir=None):
    """(mount point, socket path) for a MOUNTPOINT or container NAME (a
    mount point wins: a directory may have a container's name)."""
    is_dir = os.path.isdir(target)
    if is_dir:
        real = os.path.realpath(target)
        mnt, fstype = _mount_holding(real)
        sock = _socket_of(real) if mnt == real and fstype.startswith("fuse") else None
        if sock is not None:
            return real, sock
    if os.sep not in target:
        from unionfs.image.store import Store, default_store_path
        store = Store(store_dir or default_store_path())
        container = store.container(target)
        if container is not None:
            if not container.mountpoint or not os.path.isdir(container.mountpoint):
                raise UserError(f"container {target} is not mounted")
            mnt, _ = _mount_holding(os.path.realpath(container.mountpoint))
            sock = _socket_of(mnt) if mnt == os.path.realpath(container.mountpoint) else None
            if sock is None:
                raise UserError(f"container {target} is not mounted")
            return mnt, sock
    if is_dir:
        raise UserError(f"{target}: not a unionfs mount point")
    raise UserError(f"{target}: no such mount point or container")


# -- which ----------------------------------------------------------------------------

def _locate(path):
    """(mount point, socket, merged path) of ``path``. The last component
    is not resolved: `which` of a symlink tells about the link itself."""
    if not os.path.lexists(path):
        raise UserError(f"{path}: no such file or directory")
    parent, name = os.path.split(os.path.abspath(path))
    real = os.path.realpath(parent)
    if name not in ("", ".", ".."):
        real = os.path.join(real, name)
    else:
        real = os.path.realpath(path)
    mnt, fstype = _mount_holding(real)
    sock = _socket_of(mnt) if fstype.startswith("fuse") else None
    if sock is None:
        raise UserError(f"{path}: not inside a unionfs mount")
    merged = "/" + os.path.relpath(real, mnt) if real != mnt else "/"
    return mnt, sock, merged


def _image_layer(upper_dir, lower_dir):
    """For a mount of an image container: (diff_id, history line) of the
    layer at ``lower_dir``, or None for any other mount. The store is the
    one whose containers/NAME/upper is the mount's upper."""
    if upper_dir is None:
        return None
    container_dir = os.path.dirname(upper_dir)
    containers = os.path.dirname(container_dir)
    if os.path.basename(containers) != "containers":
        return None
    from unionfs.image.commands import history_entries
    from unionfs.image.store import Store
    store = Store(os.path.dirname(containers))
    container = store.container_by_upper(upper_dir)
    if container is None:
        return None
    try:
        image = store.image(container.image)
        config = store.config(image)
    except (OSError, ValueError, UserError):
        return None
    for h, layer in history_entries(config, image):
        if layer is not None and store.layer_root(layer.diff_id) == lower_dir:
            return layer.diff_id, (h.get("created_by") or "").strip()
    return None


def _describe(info):
    """The text of one `which` answer (after "PATH: ")."""
    if info["layer"] == "upper":
        text = "upper " + info["dir"]
        src = info["from"]
        if info["opaque"] and src is not None:
            text += f" (opaque: hides lower {src['index']} {src['dir']})"
        elif info["opaque"]:
            text += " (opaque)"
        elif info["copied_up"]:
            text += f" (copied up from lower {src['index']} {src['dir']})"
        else:
            text += " (new: nothing below it)"
    else:
        text = f"lower {info['index']} {info['dir']}"
    if info["kind"] == "directory" and len(info["layers"]) > 1:
        text += "; merged with " + ", ".join(
            "upper" if x["layer"] == "upper" else f"lower {x['index']}" for x in info["layers"][1:])
    image = info.get("image_layer")
    if image:
        text += f"\n  layer {image['diff_id']} created by: {image['created_by'] or '(no history)'}"
    return text


def cmd_which(args):
    status = EXIT_OK
    for path in args.paths:
        try:
            mnt, sock, merged = _locate(path)
            info = control.request_one(sock, {"cmd": "which", "path": merged}, mnt)
        except UserError as e:
            print(f"unionfs: {e}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        lower = info if info["layer"] == "lower" else info.get("from")
        if lower is not None:
            found = _image_layer(info.get("upper"), lower["dir"])
            if found is not None:
                info["image_layer"] = {"diff_id": found[0], "created_by": found[1]}
        info["mountpoint"] = mnt
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"{path}: {_describe(info)}", flush=True)
    return status


# -- events ---------------------------------------------------------------------------

_COPIES = (observe.COPY_UP, observe.COPY_UP_META, observe.DIR_COPY)


def format_event(ev):
    """One event as a line of text."""
    if "dropped" in ev:
        return f"-- {ev['dropped']} events dropped so far: this reader fell behind"
    t = time.strftime("%H:%M:%S", time.localtime(ev["time"])) + f".{int(ev['time'] % 1 * 1000):03d}"
    line = f"{t} {ev['kind']:<12} {ev['path']} op={ev['op'] or '-'}"
    if ev["kind"] in _COPIES:
        line += f" bytes={ev['bytes']} {_duration(ev['duration_us'])}"
    return line


def cmd_events(args):
    mnt, sock = resolve_target(args.target, args.store)
    try:
        for ev in control.request(sock, {"cmd": "events", "follow": args.follow}, mnt):
            print(json.dumps(ev) if args.json else format_event(ev), flush=True)
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not an error.
        sys.stderr.close()
    return EXIT_OK


# -- stats ----------------------------------------------------------------------------

def _duration(us):
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.1f}us"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1e6:.2f}s"


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_stats(mnt, s):
    """The stats reply as the lines `unionfs stats` prints."""
    lines = [f"{mnt}: up {s['uptime_s']:.0f} s",
             f"{'request':<14}{'count':>10}{'p50':>10}{'p99':>10}"]
    for op, r in sorted(s["requests"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"{op:<14}{r['count']:>10}{_duration(r['p50_us']):>10}{_duration(r['p99_us']):>10}")
    c, m, d = s["copy_up"], s["copy_up_meta"], s["dir_copy"]
    ev = s["events"]
    lines += [
        f"copy-ups        {c['count']} ({_size(c['bytes'])} in {_duration(c['seconds'] * 1e6)})",
        f"metadata-only   {m['count']} (in {_duration(m['seconds'] * 1e6)})",
        f"dir copies      {d['count']} ({_size(d['bytes'])} in {_duration(d['seconds'] * 1e6)})",
        f"whiteouts       {s['whiteouts']}",
        f"opaque dirs     {s['opaque_dirs']}",
        f"open files      {s['open_files']}",
        f"kernel inodes   {s.get('kernel_inodes', '-')} (looked up by the kernel, not yet forgotten)",
        f"events          {ev['recorded']} recent, {ev['listeners']} listening, {ev['dropped']} dropped",
        f"daemon          RSS {_size(s['rss_bytes'])}, CPU {s['cpu_user_s']:.2f} s user "
        f"+ {s['cpu_system_s']:.2f} s system, {s['threads']} threads",
    ]
    return "\n".join(lines)


def _fetch_stats(sock, mnt):
    return control.request_one(sock, {"cmd": "stats"}, mnt)


def cmd_stats(args):
    if args.watch and (args.json or not sys.stdout.isatty()):
        raise UserError("--watch needs a terminal (for programs: --json, repeatedly)")
    mnt, sock = resolve_target(args.target, args.store)
    if not args.watch:
        s = _fetch_stats(sock, mnt)
        print(json.dumps(s) if args.json else format_stats(mnt, s))
        return EXIT_OK
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text
    try:
        with Live(Text(format_stats(mnt, _fetch_stats(sock, mnt))), console=Console(),
                  auto_refresh=False) as live:
            while True:
                time.sleep(1)
                live.update(Text(format_stats(mnt, _fetch_stats(sock, mnt))), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK          # how one stops watching
