"""Starting a mount: what the mount command loads, and what is left when the
daemon cannot start or is stopped before it serves (see mount._mount_early:
with the /dev/fuse binding as root the mount is made before the daemon
loads, and the command returns right after it)."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FUSE_UNIONFS, UNIONFS, force_unmount, is_mounted, run, wait_for
from reliability_helpers import alive
from test_mount import assert_user_error

MOUNT_COMMANDS = {"fuse-unionfs": lambda opts, mnt: [FUSE_UNIONFS, "-o", opts, str(mnt)],
                  "unionfs mount": lambda opts, mnt: [UNIONFS, "mount", "-o", opts, str(mnt)]}


def _early_mount_expected():
    """True where mount._mount_early is the path taken (devfuse, as root)."""
    from unionfs import binding
    return os.geteuid() == 0 and binding.load().__name__.endswith(".devfuse")


def _pidfile(mnt):
    from unionfs.mount import pidfile_for
    return Path(pidfile_for(str(mnt)))


@pytest.fixture
def cleanup_mounts():
    mnts = []
    yield mnts
    for mnt in mnts:
        force_unmount(mnt)


@pytest.mark.parametrize("command", MOUNT_COMMANDS)
def test_layers_that_cannot_be_set_up_mount_nothing(layers, cleanup_mounts, command):
    """The work dir's own subdirectory is a symlink: the union refuses it
    (it would delete through it) before anything is mounted."""
    from unionfs.union import WORK_SUBDIR
    elsewhere = layers.base / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    (layers.work / WORK_SUBDIR).symlink_to(elsewhere)
    cleanup_mounts.append(layers.mnt)
    r = run(MOUNT_COMMANDS[command](layers.options(), layers.mnt), timeout=30)
    assert_user_error(r, "cannot set up the layers")
    assert not is_mounted(layers.mnt)
    assert not _pidfile(layers.mnt).exists()
    assert os.listdir(elsewhere) == ["keep"]


@pytest.mark.parametrize("command", MOUNT_COMMANDS)
def test_a_mount_the_kernel_refuses_leaves_nothing(layers, cleanup_mounts, command):
    """max_read=abc passes every check of ours; the kernel's mount(2) (or
    libfuse's) refuses it. One line, non-zero exit, no mount, no daemon."""
    cleanup_mounts.append(layers.mnt)
    r = run(MOUNT_COMMANDS[command](layers.options(extra="max_read=abc"), layers.mnt),
            timeout=30)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(command.split()[0] + ": ")
    assert not is_mounted(layers.mnt)
    assert not _pidfile(layers.mnt).exists()
    assert os.listdir(layers.upper) == []


def _mount_and_signal(layers, sig):
    # Its name first: finding it later (realpath) would look at the mount
    # point, which waits until the daemon serves.
    pidfile = _pidfile(layers.mnt)
    r = run([FUSE_UNIONFS, "-o", layers.options(), str(layers.mnt)], timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text().split()[0])   # written before the command returned
    os.kill(pid, sig)               # (where the mount is made first) before it serves
    assert wait_for(lambda: not alive(pid), timeout=30), "the daemon did not exit"
    return pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_daemon_stopped_at_once_leaves_no_mount(layers, cleanup_mounts, sig):
    """Signalled right after the mount command returned (while it still
    loads its code, where the mount is made first), the daemon takes the
    mount away, as it does once serving."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    _mount_and_signal(layers, sig)
    assert wait_for(lambda: not is_mounted(layers.mnt))
    assert wait_for(lambda: not _pidfile(layers.mnt).exists())
    assert not (layers.mnt / "f").exists()


def test_a_daemon_killed_at_once_leaves_a_dead_mount_umount_removes(layers, cleanup_mounts):
    """SIGKILL cannot be caught: the mount stays, dead, as with any FUSE
    daemon killed (fuse-overlayfs's too). Requests fail at once (the
    kernel ends the connection with the daemon's last fd; nothing waits for
    a daemon that will never read): ENOTCONN, or ECONNABORTED for one the
    kernel had already queued when the connection ended (seen on libfuse 3,
    where the daemon may be killed as the stat is sent). `unionfs umount`
    removes the mount."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    _mount_and_signal(layers, signal.SIGKILL)
    with pytest.raises(OSError) as e:
        os.stat(layers.mnt / "f")
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    r = run([UNIONFS, "umount", str(layers.mnt)], timeout=30)
    assert_user_error(r, "daemon had died")
    assert not is_mounted(layers.mnt)


def test_the_daemon_keeps_none_of_the_callers_descriptors(layers, cleanup_mounts):
    """A program mounting through the Python API has a pipe open (as a
    container engine reads the mount program's stderr until EOF): once it
    closes its end, its reader sees EOF, the daemon does not hold it."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    code = textwrap.dedent(f"""
        import os
        from unionfs.mount import mount, parse_options
        r, w = os.pipe()
        mount(parse_options([{layers.options()!r}]), {str(layers.mnt)!r})
        os.close(w)
        print("eof" if os.read(r, 1) == b"" else "data")
        print(open({str(layers.mnt / "f")!r}).read())
    """)
    r = run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["eof", "x"]


def test_a_descriptor_closed_while_mounting_is_not_taken_from_the_daemon(layers, cleanup_mounts):
    """The caller closes descriptors while the mount is made (a garbage
    socket collected, another thread): their numbers go to /dev/fuse and to
    the layers' directories, which the daemon must keep although the
    numbers were the caller's when mounting began."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    code = textwrap.dedent(f"""
        import os, sys
        import unionfs.mount
        m = sys.modules["unionfs.mount"]    # (unionfs.mount is also the API's function)
        spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
        make_union = m.make_union

        def closing_make_union(spec):       # as a collected socket would
            for fd in spare:
                os.close(fd)
            return make_union(spec)
        m.make_union = closing_make_union
        m.mount(m.parse_options([{layers.options()!r}]), {str(layers.mnt)!r})
        print(open({str(layers.mnt / "f")!r}).read())
        print(sorted(os.listdir({str(layers.mnt)!r})))
    """)
    r = run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["x", "['f']"]


def test_fuse_unionfs_loads_only_what_mounting_needs(layers, cleanup_mounts):
    """The process a container engine waits for loads neither argparse nor
    the subcommands, nor (where the mount is made before the daemon starts)
    the daemon's request code, the binding's, its control socket, threads,
    or slow-loading modules (enum: signal's and socket's; importlib)."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    code = textwrap.dedent(f"""
        import sys
        from unionfs.fuse_cli import main
        assert main(["-o", {layers.options()!r}, {str(layers.mnt)!r}]) == 0
        print(" ".join(sorted(sys.modules)))
    """)
    r = run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert (layers.mnt / "f").read_text() == "x"
    assert not loaded & {"argparse", "unionfs.cli", "unionfs.container", "unionfs.image"}
    if _early_mount_expected():     # (a libfuse binding is loaded to check it is there)
        assert not loaded & {"unionfs.fs", "unionfs.control", "socket", "dataclasses", "typing",
                             "hashlib", "logging", "json", "re", "unionfs.binding.devfuse",
                             "unionfs.binding.common", "threading", "collections", "enum",
                             "signal", "importlib"}


def test_unionfs_mount_parses_its_plain_form_without_argparse(layers, cleanup_mounts):
    """`unionfs mount -o OPTS MNT` mounts without loading argparse nor any
    other subcommand's module, nor (where the mount is made before the
    daemon starts) what argparse would bring (re, gettext, shutil)."""
    (layers.lowers[0] / "f").write_text("x")
    cleanup_mounts.append(layers.mnt)
    code = textwrap.dedent(f"""
        import sys
        from unionfs.cli import main
        assert main(["mount", "-o", {layers.options()!r}, {str(layers.mnt)!r}]) == 0
        print(" ".join(sorted(sys.modules)))
    """)
    r = run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    assert (layers.mnt / "f").read_text() == "x"
    loaded = set(r.stdout.split())
    assert not loaded & {"argparse", "unionfs.image", "unionfs.container", "unionfs.registry"}
    if _early_mount_expected():     # (a libfuse binding loads ctypes.util: re, shutil)
        assert not loaded & {"re", "shutil", "gettext"}


@pytest.mark.parametrize("argv", [
    ["mount", "-o", "a=1", "/m"], ["mount", "/m", "-o", "a=1", "-oB=2"],
    ["mount", "-f", "--debug", "-o", "x", "/m"], ["mount", "/m"], ["mount", "-ox,y", "/m", "-f"]])
def test_the_plain_mount_form_parses_as_argparse_does(argv):
    from unionfs import cli     # noqa: F401 (unionfs.cli, the module)
    cli = sys.modules["unionfs.cli"]
    plain, parsed = cli._plain_mount(argv), cli.build_parser(core_only=True).parse_args(argv)
    assert ((plain.options, plain.foreground, plain.debug, plain.mountpoint, plain.func)
            == (parsed.options, parsed.foreground, parsed.debug, parsed.mountpoint, parsed.func))


@pytest.mark.parametrize("argv", [
    ["mount"], ["mount", "-o"], ["mount", "-o", "-f", "/m"], ["mount", "a", "b"],
    ["mount", "--", "/m"], ["mount", "-h"], ["mount", "--deb", "/m"], ["mount", "-o=x", "/m"],
    ["umount", "/m"]])
def test_anything_else_is_left_to_argparse(argv):
    from unionfs import cli     # noqa: F401
    assert sys.modules["unionfs.cli"]._plain_mount(argv) is None
