"""Rootless podman on fuse-unionfs, run by tests/test_podman.py as root in a
private mount namespace (``unshare -m --propagation private``).

It gives an unprivileged user everything rootless podman needs without
touching a host file: temp copies of /etc/passwd, /etc/group (plus the user)
and /etc/subuid, /etc/subgid (a range for it) bind-mounted over the real ones,
a /dev/fuse node every user may open bind-mounted over /dev/fuse (the host's
is root's only), and a HOME, XDG_RUNTIME_DIR and storage in BASE. Then, as
that user: podman imports IMAGE_TAR and runs containers, once with the
storage's ids and once with ``--uidmap``/``--gidmap``, for which
containers/storage passes ``uidmapping=``/``gidmapping=`` to the mount
program. Prints one JSON object of what was seen; a step that fails is
reported under "error" with podman's message, and "skip" says the machine
does not allow rootless podman at all.

argv: BASE UID SUBID_BASE PYTHON SOURCE_DIR IMAGE_TAR
"""

import json
import os
import stat
import subprocess
import sys

BASE, UID, SUBID, PYTHON, SOURCE, IMAGE_TAR = sys.argv[1:7]
UID, SUBID = int(UID), int(SUBID)
USER = f"unionfs-rootless-{UID}"
HOME, XDG = f"{BASE}/home", f"{BASE}/xdg"
IMAGE = "localhost/unionfs-rootless:1"
FUSE_MISC_MAJOR, FUSE_MINOR = 10, 229

# As the container sees it: owners of the image's files, then what it writes.
SCRIPT = ("stat -c '%u:%g %n' /data/root-file /data/user-file; id -u; "
          "echo new > /data/user-dir/new; chown 1000:1000 /data/root-file; "
          "mkdir /data/made; chown 1000:1000 /data/made")


def bind_over(path, content):
    own = f"{BASE}/etc/{os.path.basename(path)}"
    with open(own, "w") as f:
        f.write(content)
    os.chmod(own, 0o644)
    subprocess.run(["mount", "--bind", own, path], check=True)


def as_user(*argv, timeout=240):
    env = {"HOME": HOME, "XDG_RUNTIME_DIR": XDG, "XDG_CONFIG_HOME": f"{HOME}/.config",
           "USER": USER, "LOGNAME": USER, "TMPDIR": f"{BASE}/tmp",
           "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
    return subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                           "--", *argv], env=env, cwd=HOME, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def podman(*args):
    r = as_user("podman", *args)
    if r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {r.returncode}: "
                           f"{r.stderr.strip()[-2000:]}")
    return r.stdout


def setup():
    os.makedirs(f"{BASE}/etc")
    for name in ("passwd", "group", "subuid", "subgid"):
        if not os.path.exists(f"/etc/{name}"):
            return f"/etc/{name} does not exist to bind a temp copy over"
    with open("/etc/passwd") as f:
        bind_over("/etc/passwd", f.read() + f"{USER}:x:{UID}:{UID}::{HOME}:/bin/sh\n")
    with open("/etc/group") as f:
        bind_over("/etc/group", f.read() + f"{USER}:x:{UID}:\n")
    for name in ("subuid", "subgid"):
        bind_over(f"/etc/{name}", f"{USER}:{SUBID}:65536\n")
    node = f"{BASE}/fuse"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(FUSE_MISC_MAJOR, FUSE_MINOR))
    os.chmod(node, 0o666)
    subprocess.run(["mount", "--bind", node, "/dev/fuse"], check=True)
    conf = f"{HOME}/.config/containers"
    for d in (conf, XDG, f"{BASE}/tmp"):
        os.makedirs(d)
    # The mount program: this project's fuse-unionfs, run by a python the
    # user can execute, logging its argv (to check what podman passed).
    program = f"{HOME}/fuse-unionfs"
    with open(program, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" >> {HOME}/mount-program.log\n'
                f'exec {PYTHON} -c "import sys; sys.path.insert(0, sys.argv.pop(1)); '
                f'from unionfs.cli import fuse_main; sys.exit(fuse_main())" {SOURCE} "$@"\n')
    os.chmod(program, 0o755)
    with open(f"{conf}/storage.conf", "w") as f:
        f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{HOME}/storage"\n'
                f'runroot = "{XDG}/storage"\n\n[storage.options.overlay]\n'
                f'mount_program = "{program}"\n')
    with open(f"{conf}/containers.conf", "w") as f:
        f.write(f'[containers]\nnetns = "none"\n\n[engine]\nruntime = "runc"\n'
                f'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                f'tmp_dir = "{BASE}/tmp"\n')
    with open(f"{conf}/policy.json", "w") as f:
        f.write('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    with open(f"{conf}/registries.conf", "w") as f:
        f.write("unqualified-search-registries = []\n")
    subprocess.run(["chown", "-R", f"{UID}:{UID}", HOME, XDG, f"{BASE}/tmp"], check=True)
    os.chmod(XDG, 0o700)
    return None


def main():
    out = {}
    why_not = setup()
    if why_not is None:
        r = as_user("podman", "info", "--format", "{{.Host.Security.Rootless}}")
        if r.returncode != 0 or r.stdout.strip() != "true":
            why_not = f"rootless podman does not start here: {r.stderr.strip()[-500:]}"
    if why_not is not None:
        print(json.dumps({"skip": why_not}))
        return
    try:
        podman("import", "--quiet", IMAGE_TAR, IMAGE)
        out["plain"] = podman("run", "--rm", IMAGE, "/bin/sh", "-c", SCRIPT).splitlines()
        out["mapped"] = podman("run", "--name", "mapped", "--uidmap", "0:100:5000",
                               "--gidmap", "0:100:5000", IMAGE, "/bin/sh", "-c",
                               SCRIPT).splitlines()
        upper = podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                       "mapped").strip()
        # The owners stored in the upper, as the host sees them.
        out["upper"] = {name: [os.lstat(f"{upper}/data/{name}").st_uid,
                               os.lstat(f"{upper}/data/{name}").st_gid]
                        for name in ("root-file", "made", "user-dir/new")}
        with open(f"{HOME}/mount-program.log") as f:
            out["mount_program_argv"] = f.read().splitlines()
        podman("rm", "mapped")
        podman("rmi", "--all", "--force")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        out["error"] = str(e)
    print(json.dumps(out))


main()
