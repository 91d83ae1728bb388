"""Mount options, validation, the daemon, and unmounting.

``mount()`` validates everything a user can get wrong *before* anything is
created, and returns once the mount is live -- or raises ``UserError`` with
the reason, leaving nothing mounted. Live: with the /dev/fuse binding as
root, mount(2) has succeeded (requests wait in the kernel until the daemon,
forked right after, serves them: see _mount_early); otherwise the daemon
has mounted and reported from FUSE's ``init``.
"""

import errno
import gc
import os
import sys
import time

from unionfs import whiteout as wh
from unionfs.errors import FuseUnavailableError, UserError
from unionfs.idmap import IdMap, parse_ranges
from unionfs.osutil import proc_start as _proc_start, proc_stat as _proc_stat

# -- options ----------------------------------------------------------------

# libfuse options passed through unchanged: mount flags, FUSE mount options,
# and options of the low-level session and connection. Those only libfuse 2
# knows (big_writes, nonempty) are dropped under libfuse 3, which needs none.
FUSE_FLAGS = {
    "allow_other", "allow_root", "default_permissions", "ro", "rw", "suid",
    "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "atime",
    "noatime", "dirsync", "nonempty", "blkdev", "auto_unmount",
    "big_writes", "async_read", "sync_read", "atomic_o_trunc", "no_remote_lock",
    "no_remote_flock", "no_remote_posix_lock", "splice_read", "splice_write",
    "splice_move", "no_splice_read", "no_splice_write", "no_splice_move",
}
FUSE_VALUED = {
    "fsname", "subtype", "max_read", "blksize", "context", "fscontext",
    "defcontext", "rootcontext", "max_write", "max_readahead",
    "max_background", "congestion_threshold",
}
# Cache lifetimes (seconds) for entries and attributes: all set one value.
TIMEOUT_OPTIONS = {"timeout", "attr_timeout", "entry_timeout", "negative_timeout"}
# Options of kernel overlayfs / fuse-overlayfs, of mount(8), or of libfuse's
# high-level library, that change nothing a user of this filesystem sees
# (the daemon always behaves as they ask): accepted, ignored with one warning.
IGNORED = {
    "relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
    "nodiratime", "lazytime", "nolazytime", "redirect_dir", "index",
    "userxattr", "xino", "noacl", "acl", "static_nlink",
    "xattr_permissions", "max_idle_threads", "clone_fd", "nfs_export",
    "fsync", "fast_ino", "writeback", "defaults", "_netdev", "nofail",
    "user", "users", "noauto", "auto", "use_ino", "readdir_ino",
    "hard_remove", "kernel_cache", "auto_cache", "noauto_cache", "noforget",
    "remember", "intr", "intr_signal", "modules", "large_read", "direct_io",
}
# fuse-overlayfs options whose effect we do not implement and that *would*
# change what the user sees: refused even by fuse-unionfs.
REFUSED = {"plugins", "uid", "gid", "umask"}

# Defaults, each measured or required (see docs/PERFORMANCE.md, README):
DEFAULT_FUSE_OPTIONS = {
    "default_permissions": True,    # the kernel checks modes for every user
    "fsname": "unionfs",
    "subtype": "unionfs",
}
# Mounted by root, a union is a container rootfs for every user, and behaves
# as kernel overlayfs does: set-id files and device nodes work (libfuse's own
# default is nosuid,nodev). For other users fusermount3 forces nosuid,nodev.
ROOT_FUSE_OPTIONS = {"allow_other": True, "suid": True, "dev": True}
# Mount flags that cancel each other: the one the user gives replaces the default.
_OPPOSITE_FLAGS = {"suid": "nosuid", "nosuid": "suid", "dev": "nodev", "nodev": "dev",
                   "exec": "noexec", "noexec": "exec"}


class MountSpec:
    """What to mount. A plain class, not a dataclass: importing dataclasses
    (inspect, ast, ...) costs every mount's start several ms."""

    def __init__(self, lowerdirs, upperdir=None, workdir=None, whiteout=wh.FORMAT_AUTO,
                 fuse_options=None, volatile=False, timeout=None, threaded=False, ids=None,
                 metacopy=False):
        self.lowerdirs = lowerdirs          # top-most first, as in lowerdir=TOP:...:BOTTOM
        self.upperdir = upperdir
        self.workdir = workdir
        self.whiteout = whiteout
        self.fuse_options = {} if fuse_options is None else fuse_options
        self.volatile = volatile            # skip fsync of copied-up data
        self.timeout = timeout              # kernel cache lifetime (None: fs.DEFAULT_TIMEOUT)
        self.threaded = threaded            # libfuse's multi-threaded loop (see serve())
        self.ids = IdMap() if ids is None else ids      # uid/gid mapping (idmap.py)
        # Metadata-only copy-up (metacopy.py). Off by default, as on kernel
        # overlayfs: an upper with metacopy files needs kernel overlayfs
        # mounted with metacopy=on, and engines that read the upper directly
        # (podman through fuse-overlayfs's contract) do not know them.
        self.metacopy = metacopy


def split_options(optstrings):
    """Options from one or more ``-o`` strings; empty items (doubled or
    trailing commas, as container engines write them) are skipped."""
    items = []
    for s in optstrings:
        items.extend(i for i in s.split(",") if i)
    return items


def parse_options(optstrings, strict=True, warn=None, lowerdirs=()):
    """Build a MountSpec from ``-o`` strings.

    ``strict`` (``unionfs mount``): an unknown option is an error. Otherwise
    (``fuse-unionfs``, fuse-overlayfs's contract) it is ignored with a warning.
    ``lowerdirs`` (the Python API) are the layers when no ``lowerdir=`` is given.
    """
    spec = MountSpec(lowerdirs=list(lowerdirs))
    ignored = []
    ids = {}
    for item in split_options(optstrings):
        key, eq, value = item.partition("=")
        if key == "lowerdir":
            spec.lowerdirs = [d for d in value.split(":") if d]
        elif key == "upperdir":
            spec.upperdir = value
        elif key == "workdir":
            spec.workdir = value
        elif key == "whiteout":
            if value not in wh.FORMATS:
                raise UserError(f"whiteout={value}: must be one of {', '.join(wh.FORMATS)}")
            spec.whiteout = value
        elif key == "metacopy" and eq:
            if value not in ("on", "off"):
                raise UserError(f"metacopy={value}: must be on or off")
            spec.metacopy = value == "on"
        elif key == "volatile":
            spec.volatile = True
        elif key in TIMEOUT_OPTIONS and eq:
            try:
                spec.timeout = float(value)
            except ValueError:
                raise UserError(f"{key}={value}: not a number of seconds")
        elif key == "passthrough" and eq:
            if value not in ("on", "off"):
                raise UserError(f"passthrough={value}: must be on or off")
            spec.fuse_options["passthrough"] = value
        elif key == "threaded" and eq:
            spec.threaded = value not in ("0", "false", "no")
        elif key in ("uidmapping", "gidmapping") and eq:
            try:
                ids["uids" if key == "uidmapping" else "gids"] = parse_ranges(value)
            except ValueError as e:
                raise UserError(f"{key}={value}: {e}")
        elif key in ("squash_to_uid", "squash_to_gid") and eq:
            if not value.isdigit() or int(value) > 0xFFFFFFFE:
                raise UserError(f"{key}={value}: not a uid/gid")
            ids["squash_uid" if key == "squash_to_uid" else "squash_gid"] = int(value)
        elif key == "squash_to_root" and not eq:
            ids["squash_root"] = True
        elif key in REFUSED:
            raise UserError(f"option {key!r} is not supported by unionfs")
        elif (key in FUSE_FLAGS and not eq) or (key in FUSE_VALUED and eq):
            spec.fuse_options[key] = value if eq else True
        elif key in IGNORED or key.startswith("x-"):
            ignored.append(key)
        elif strict:
            raise UserError(f"unknown mount option {item!r}")
        else:
            ignored.append(key)
    spec.ids = IdMap(**ids)
    if ignored and warn is not None:
        warn(f"ignoring mount options: {', '.join(sorted(set(ignored)))}")
    if not spec.lowerdirs:
        raise UserError("missing lowerdir=DIR[:DIR...] option")
    return spec


# -- validation ---------------------------------------------------------------

def _inside(a, b):
    """True if real path ``a`` is ``b`` or below it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def _existing_dir(role, path):
    if not os.path.exists(path):
        raise UserError(f"{role} {path}: no such directory")
    if not os.path.isdir(path):
        raise UserError(f"{role} {path}: not a directory")
    return os.path.realpath(path)


def existing_mountpoint(path):
    """The real path of mount point ``path``. Every mount command requires
    it to exist, as mount(8) does: a mistyped path is reported, not created."""
    return _existing_dir("mountpoint", path)


def validate(spec, mountpoint):
    """Check what the user gave before anything is created or mounted."""
    lowers = [_existing_dir("lowerdir", d) for d in spec.lowerdirs]
    mnt = existing_mountpoint(mountpoint)
    named = [("lowerdir", d) for d in lowers]
    if (spec.upperdir is None) != (spec.workdir is None):
        raise UserError("upperdir and workdir must be given together")
    if spec.upperdir is not None:
        upper = _existing_dir("upperdir", spec.upperdir)
        work = _existing_dir("workdir", spec.workdir)
        if not os.access(upper, os.W_OK) or not os.access(work, os.W_OK):
            raise UserError(f"upperdir {spec.upperdir} and workdir {spec.workdir} must be writable")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise UserError(f"workdir {spec.workdir} must be on the same filesystem as upperdir {spec.upperdir}")
        named += [("upperdir", upper), ("workdir", work)]
    # Lowers may nest (they are only read); anything written must not be
    # reachable through another layer, or one write would show twice.
    for i, (role_a, a) in enumerate(named):
        for role_b, b in named[i + 1:]:
            if role_a == role_b == "lowerdir":
                continue
            if _inside(a, b) or _inside(b, a):
                raise UserError(f"{role_a} {a} overlaps {role_b} {b}")
    for role, d in named:
        if _inside(mnt, d) or _inside(d, mnt):
            raise UserError(f"mountpoint {mnt} overlaps {role} {d}")
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError("/dev/fuse is missing: this machine cannot mount FUSE filesystems")
    try:
        from unionfs import binding
        if not binding.is_devfuse():    # devfuse needs the standard library only:
            binding.load()              # not loaded here (see _early_binding)
    except ValueError as e:
        raise UserError(str(e))
    except (OSError, ImportError) as e:
        raise FuseUnavailableError(f"cannot load libfuse ({e}); install the fuse3 or libfuse2 package")
    return mnt


# -- the daemon -----------------------------------------------------------------

# subprocess and tempfile are imported where used: a mount needs neither,
# and every container start pays for each module the daemon imports.

def _runtime_dir():
    # Root of a user namespace (rootless podman's mount program) is uid 0
    # without the right to write /run: it takes the unprivileged place.
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        base = "/run/unionfs"
    else:
        import tempfile
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
                            f"unionfs-{os.geteuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


_PIDFILE_KEY = 24       # hex digits of a mount point's hash in its pidfile's name


def pidfile_for(mountpoint):
    key = _sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:_PIDFILE_KEY]
    return os.path.join(_runtime_dir(), key + ".pid")


def _sha256(data):
    """hashlib.sha256(data), without loading OpenSSL where CPython's own
    module is there (hashlib's import is ~2.5 ms of every mount's start)."""
    for name in ("_sha2", "_sha256"):       # CPython 3.12+, 3.11
        try:
            return __import__(name).sha256(data)
        except ImportError:
            pass
    import hashlib
    return hashlib.sha256(data)


def fuse_options_for(spec, ll):
    """The libfuse -o options for ``spec`` under binding ``ll``."""
    opts = dict(DEFAULT_FUSE_OPTIONS)
    opts.update(ll.DEFAULT_OPTIONS)
    if os.geteuid() == 0:
        opts.update(ROOT_FUSE_OPTIONS)
    if spec.upperdir is None:
        opts["ro"] = True
    for key in spec.fuse_options:
        opts.pop(_OPPOSITE_FLAGS.get(key), None)
    opts.update(spec.fuse_options)
    if opts.pop("rw", None) and spec.upperdir is None:
        opts["ro"] = True
    if not getattr(ll, "PASSTHROUGH", False):
        opts.pop("passthrough", None)   # only the /dev/fuse binding can
    return opts


def option_list(spec, ll, debug=False):
    """``fuse_options_for`` as libfuse's ``-o`` items."""
    options = [k if v is True else f"{k}={v}" for k, v in fuse_options_for(spec, ll).items()]
    if debug:
        options.append("debug")
    return options


def make_union(spec):
    """The union ``spec`` names; UserError if its layers cannot be set up."""
    from unionfs.union import Union
    try:
        return Union(spec.lowerdirs, spec.upperdir, spec.workdir,
                     whiteout=spec.whiteout, fsync=not spec.volatile, ids=spec.ids,
                     metacopy=spec.metacopy)
    except OSError as e:
        raise UserError(f"cannot set up the layers: {e.strerror}: {e.filename}")


def serve(spec, mountpoint, debug=False, on_ready=None, union=None, fd=None, pidfile=None):
    """Run the filesystem in this process until it is unmounted.

    ``union``, ``fd`` and ``pidfile``: what ``_mount_early`` made already
    (the union, the device fd of a mount that exists and is served only
    here: nothing here may look at the mount point, it would wait for
    itself; the pidfile's name): served here, and detached if serving
    cannot start.
    """
    try:
        from unionfs import control, layers, observe
        from unionfs.binding import common
        from unionfs.fs import DEFAULT_TIMEOUT, UnionFS, Workers, ll
        if union is None:
            union = make_union(spec)
        os.umask(0)     # modes arrive from the kernel with the caller's umask applied
        layers.thread_cwd = True    # this process is the daemon's (layers.xattr_call)
        recorder = observe.Recorder()
        if union.copyup is not None:
            union.copyup.observer = recorder
        fs = UnionFS(union, timeout=DEFAULT_TIMEOUT if spec.timeout is None else spec.timeout,
                     on_init=on_ready, watch=recorder)
        options = option_list(spec, ll, debug)
        if pidfile is None:
            pidfile = pidfile_for(mountpoint)
        control_server = control.Server(control.socket_for(pidfile), recorder,
                                        union, extra=fs.stats)
    except BaseException:
        if fd is not None:
            from unionfs import binding
            binding.load().detach(mountpoint)   # the binding that mounted it
        raise
    try:
        control_server.start()
    except OSError as e:
        # The mount matters more than watching it: serve without.
        print(f"unionfs: warning: no control socket ({e}); stats and events are off",
              file=sys.stderr)
    # Default: one thread reads requests and answers the quick ones; slow
    # ones go to workers (measured faster than libfuse's thread-per-request
    # loop, whose threads fight over the GIL). threaded=1 selects the latter.
    workers = None if spec.threaded else Workers()
    quiet_gc()
    try:
        if fd is None:
            ll.run(fs.handlers(workers), mountpoint, options, threaded=spec.threaded)
        else:
            ll.run(fs.handlers(workers), mountpoint, options, threaded=spec.threaded, fd=fd)
    except common.MountError as e:
        raise RuntimeError(str(e))
    finally:
        control_server.stop()
        if workers is not None:
            workers.stop()


GC_YOUNG_THRESHOLD = 14_000     # allocations between young collections (Python: 700)


def quiet_gc():
    """Make the cyclic garbage collector cheap for a daemon that holds many
    long-lived objects and makes little cyclic garbage. What exists once the
    daemon is set up (modules, the layer stack) lives as long as it does:
    frozen, no full collection scans it again. Requests make young objects
    that mostly die young (cache entries, replies): a first generation 20x
    larger than Python's default lets most of them go by reference count
    before any scan. Measured on a cold find over 505,000 files: the
    collector's CPU time fell from 0.88 s to 0.37 s (of ~16 s)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def mount(spec, mountpoint, foreground=False, debug=False):
    """Mount ``spec`` on ``mountpoint``; return once it is live, with the
    daemon's pid (a child of this process) unless in the foreground."""
    mountpoint = validate(spec, mountpoint)
    prune_pidfiles()
    if foreground or debug:
        pidfile = pidfile_for(mountpoint)
        _write_pidfile(pidfile)
        try:
            serve(spec, mountpoint, debug=debug)
        except RuntimeError:
            raise UserError(f"mounting {mountpoint} failed (see the message above)")
        finally:
            _remove(pidfile)
        return
    early = _early_binding(spec)
    if early is not None:
        return _mount_early(spec, mountpoint, *early)

    errlog = os.fdopen(os.memfd_create("unionfs-errlog"), "w+b")    # the daemon's stderr
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the daemon
        os.close(rfd)
        os._exit(_daemon(spec, mountpoint, wfd, errlog))
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        status = r.read()
    if status.startswith(b"ok"):
        return pid
    _, code = os.waitpid(pid, 0)
    reason = status.decode(errors="replace").strip()
    if not reason:
        errlog.seek(0)
        lines = [l for l in errlog.read().decode(errors="replace").splitlines() if l.strip()]
        reason = lines[-1].strip() if lines else f"daemon exited with status {code >> 8}"
    raise UserError(f"mounting {mountpoint} failed: {reason}")


# -- mounting before the daemon starts ------------------------------------------
#
# With the /dev/fuse binding, as root, the mount is made by mount(2) in this
# process, after the layers are set up and before any of the daemon's code
# is loaded; then the daemon is forked and this process returns. The kernel
# queues what comes to the mount meanwhile (INIT first) until the daemon
# reads it, so a container engine waiting for its mount program goes on
# with its work while the daemon loads. Everything a user can get wrong is
# found before mount(2) (validate, make_union): a failure leaves no mount.
# A daemon that fails to start detaches the mount, as does one sent SIGTERM,
# SIGINT or SIGHUP before it serves; one killed with SIGKILL leaves it dead
# (ENOTCONN) as a daemon killed later does; `unionfs umount` removes it.

def _early_binding(spec):
    """(binding, options) if this mount can be made before the daemon
    starts, else None (libfuse makes its mounts itself; fusermount3 is
    needed for some options)."""
    from unionfs import binding
    try:
        if not binding.is_devfuse():
            return None         # the libfuse bindings are loaded by the daemon only
    except ValueError as e:
        raise UserError(str(e))
    # devmount, not devfuse: the request code, its layouts and structures
    # are the daemon's to load, after the fork (~1.5-2 ms of CPU).
    from unionfs.binding import MountError
    from unionfs.binding import devmount as ll
    options = option_list(spec, ll)
    try:
        return (ll, options) if ll.can_mount_early(options) else None
    except MountError as e:
        raise UserError(str(e))


def _mount_early(spec, mountpoint, ll, options):
    """Mount, fork the daemon to serve the mount, return the daemon's pid."""
    from unionfs.binding import MountError
    inherited = _open_fds()         # the caller's: the daemon lets go of them
    union = make_union(spec)
    pidfile = pidfile_for(mountpoint)   # before mounting: it looks at the mount point
    try:
        fd = ll.mount_early(mountpoint, options)
    except MountError as e:
        raise UserError(f"mounting {mountpoint} failed: {e}")
    # Blocked across the fork: a stop signal reaching the daemon before its
    # handlers are set would kill it and leave the mount dead. _signal is
    # the C module the signal module wraps: the same calls, with plain ints
    # for signals and masks, and without signal's import of enum (~1-2 ms
    # of every mount's start; the daemon loads it later, off the command's path).
    import _signal as signal
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        pid = os.fork()
    except BaseException as e:      # no daemon (or Ctrl-C): nothing will serve the mount
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        ll.detach(mountpoint)
        os.close(fd)
        if isinstance(e, OSError):
            raise UserError(f"mounting {mountpoint} failed: cannot start the daemon: {e.strerror}")
        raise
    if pid == 0:
        code = 1
        try:        # the daemon never returns into the caller's code, whatever happens
            code = _early_daemon(spec, mountpoint, union, ll, fd, inherited, pidfile, old_mask)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(fd)
    _write_pidfile(pidfile, pid)
    return pid


def _early_daemon(spec, mountpoint, union, ll, fd, inherited, pidfile, mask):
    """Child side of _mount_early: detach from the caller, serve ``fd``
    (``mask``: the signal mask to restore once the stop signals are ours)."""
    import _signal as signal        # as in _mount_early
    os.setsid()

    def give_up(*_):        # until ll.run takes these signals over
        ll.detach(mountpoint)
        _remove(pidfile)
        os._exit(1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, give_up)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    null = os.open(os.devnull, os.O_RDWR)
    # What the daemon serves with is kept even if its number was in the
    # snapshot: another thread of the caller may have closed one of those
    # between the snapshot and mount(2), and the number gone to /dev/fuse or
    # to a layer's directory.
    _drop_inherited_fds(null, keep={fd} | union.descriptors(), only=inherited)
    for std in (0, 1, 2):
        os.dup2(null, std)
    try:
        serve(spec, mountpoint, union=union, fd=fd, pidfile=pidfile)
        return 0
    except BaseException:
        return 1
    finally:
        _remove(pidfile)


def _daemon(spec, mountpoint, wfd, errlog):
    """Child side of mount(): detach, serve, report readiness on ``wfd``."""
    import signal
    os.setsid()
    # Signals as in a fresh process: libfuse installs its handlers (a clean
    # unmount on SIGTERM, SIGINT, SIGHUP) only over the defaults, and a daemon
    # forked by a program with handlers of its own (a test run using the
    # Python API) must not run that program's handlers.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    _drop_inherited_fds(null, keep=(wfd, errlog.fileno()))
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(errlog.fileno(), 2)     # libfuse's own messages, for the parent
    pidfile = pidfile_for(mountpoint)

    def ready():
        _write_pidfile(pidfile)
        os.write(wfd, b"ok\n")
        os.close(wfd)
        os.dup2(null, 2)

    try:
        serve(spec, mountpoint, on_ready=ready)
        return 0
    except UserError as e:
        _report(wfd, str(e))
        return 1
    except RuntimeError:
        _report(wfd, "")            # libfuse said why on stderr (errlog)
        return 1
    except BaseException as e:      # a bug: say what, briefly
        _report(wfd, f"internal error: {type(e).__name__}: {e}")
        return 1
    finally:
        _remove(pidfile)


def _open_fds():
    """The numbers of this process's open descriptors."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))     # the listing's own descriptor is closed by now
        except OSError:
            continue
        fds.add(int(name))
    return fds


def _drop_inherited_fds(null, keep, only=None):
    """Let go of every descriptor the forking program had open (above 2,
    except ``keep``; of those, only those in ``only`` if given): one for a
    file inside another mount would keep that mount busy, one for a pipe
    would keep its reader waiting, for as long as this daemon runs. Each is
    replaced by /dev/null rather than closed, so its number is never reused
    under a Python object of the forking program that still believes it
    owns it."""
    for fd in _open_fds():
        if fd <= 2 or fd == null or fd in keep or (only is not None and fd not in only):
            continue
        os.dup2(null, fd)


def _report(wfd, msg):
    try:
        os.write(wfd, msg.encode())
        os.close(wfd)
    except OSError:
        pass        # already reported ready; nobody is listening


# A pidfile holds "PID STARTTIME": the start time (field 22 of
# /proc/PID/stat) tells this daemon from a later process that got its pid
# after a crash left the file behind.

def _write_pidfile(path, pid=None):
    pid = os.getpid() if pid is None else pid
    tmp = f"{path}.{pid}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid} {_proc_start(pid)}\n")
    os.rename(tmp, path)


def _read_pidfile(path):
    """The daemon's pid from ``path`` if that process still runs, else None."""
    try:
        with open(path) as f:
            pid, _, start = f.read().strip().partition(" ")
        pid = int(pid)
    except (OSError, ValueError):
        return None
    now = _proc_start(pid)
    if now is None or (start and start != now):
        return None
    return pid


def prune_pidfiles():
    """Remove pidfiles whose daemon is gone (killed daemons leave them)."""
    try:
        base = _runtime_dir()
        names = os.listdir(base)
    except OSError:
        return
    # control (socket, json) is loaded only for something to remove: a
    # mount's start need not pay for it.
    for name in names:
        path = os.path.join(base, name)
        if name.endswith(".pid") and len(name) == _PIDFILE_KEY + len(".pid"):
            if _read_pidfile(path) is None:
                from unionfs import control
                _remove(path)
                _remove(control.socket_for(path))
        elif name[:_PIDFILE_KEY] + ".pid" not in names:
            from unionfs import control
            # A daemon killed before it wrote its pidfile leaves only this;
            # one still starting listens already, so it is never taken.
            if (name.endswith(control.SUFFIX) and len(name) == _PIDFILE_KEY + len(control.SUFFIX)
                    and control.is_stale(path)):
                _remove(path)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- unmounting ---------------------------------------------------------------

def _mount_entry(mountpoint):
    """The /proc/self/mountinfo fields of ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == target:
                sep = fields.index("-")
                found = (fields[sep + 1], fields[sep + 2])      # fstype, source
    return found


def _daemon_pid(mountpoint):
    return _read_pidfile(pidfile_for(mountpoint))


def _alive(pid):
    """True while ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def umount(mountpoint, timeout=30):
    """Unmount a unionfs mount and wait for its daemon to finish."""
    # The mount table first: stat of a mount whose daemon died fails
    # (ENOTCONN), so existence is only checked for what is not mounted.
    entry = _mount_entry(mountpoint)
    if entry is None or not entry[0].startswith("fuse"):
        if not os.path.lexists(mountpoint):
            raise UserError(f"{mountpoint}: no such directory")
        raise UserError(f"{mountpoint} is not a FUSE mount")
    pid = _daemon_pid(mountpoint)
    stale = False
    try:
        os.statvfs(mountpoint)      # always asks the daemon (stat may be cached)
    except OSError as e:
        stale = e.errno == errno.ENOTCONN
    cmd = ["fusermount", "-u"] + (["-z"] if stale else []) + [mountpoint]
    if os.geteuid() == 0:
        cmd = ["umount"] + (["-l"] if stale else []) + [mountpoint]
    import subprocess
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
        if "busy" in msg:
            raise UserError(f"{mountpoint} is busy (a process still uses it)")
        raise UserError(f"unmounting {mountpoint} failed: {msg}")
    if stale:
        raise UserError(f"{mountpoint}: the daemon had died; the stale mount was removed")
    if pid is not None:
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

