#!/usr/bin/env python3
"""A small mutation check: break one critical behaviour at a time and make
sure the tests that claim it notice.

Each mutant below is a one-line change to the checkout (the package, or a
script it ships): a file, a snippet
that must occur in it exactly once, the replacement, and the tests that
must fail with it applied. For every mutant the script

1. copies the checkout (its git-tracked and untracked-but-not-ignored
   files) into a temporary directory -- the working tree is never touched;
2. runs the named tests there once unmutated (they must pass: a mutant is
   only "caught" by a test that passes without it);
3. applies the mutant to the copy and runs only the named tests, with the
   copy first on PYTHONPATH and as the working directory, so the tests, the
   console scripts of the venv (``unionfs``, ``fuse-unionfs``) and the
   daemons they start all import the copy, not the installed package (this
   is checked before anything runs);
4. reports each mutant as caught or SURVIVED.

It exits 0 only when every mutant is caught. A snippet that is missing or
not unique is an error too (exit 2): the code moved, update the mutant.

Adding a mutant (new features add theirs here): append
``M(file, old, new, tests, what)`` to MUTANTS -- in a group of your own at
the end, under a ``# -- feature`` comment, so parallel additions merge --
with

- ``file``: path from the checkout root, e.g. ``"unionfs/union.py"``;
- ``old``: an exact snippet of that file, unique in it (include enough of
  the line to make it so; leading indentation is part of the snippet);
- ``new``: what replaces it -- the smallest change that breaks the
  behaviour (drop a call, negate a check, return early); the result must
  still compile;
- ``tests``: pytest node ids that must fail (keep them few and fast: they
  run once per mutant);
- ``what``: one line saying which behaviour is broken.

Run: ``.venv/bin/python scripts/mutants.py`` (``-k WORD`` runs the mutants
whose ``what`` or file contains WORD; ``--list`` lists them). ``make
test-slow`` runs it through tests/test_mutants.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT = 600          # seconds for one pytest run of one mutant


@dataclass(frozen=True)
class Mutant:
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def M(file, old, new, tests, what):
    return Mutant(file, old, new, tuple(tests), what)


MUTANTS = [
    # -- the union's core: whiteouts, opaque directories, copy-up -------------
    M("unionfs/namespace.py", "_whiteout(u, path, is_dir and node.in_upper)",
      "_remove_upper(u, path, is_dir)",
      ["tests/test_core.py::test_unlink_lower_leaves_whiteout",
       "tests/test_core.py::test_rmdir"],
      "unlink/rmdir of a lower entry leaves no whiteout"),
    M("unionfs/namespace.py", "        if is_dir:\n            u.writer.set_opaque(work, tmp)",
      "        if False:\n            u.writer.set_opaque(work, tmp)",
      ["tests/test_core.py::test_mkdir_over_whiteout_is_opaque"],
      "mkdir over a whiteout does not make the directory opaque"),
    M("unionfs/copyup.py", "        dst_layer.chown(dst, st.st_uid, st.st_gid)",
      "        pass",
      ["tests/test_core.py::test_write_copies_up_with_metadata"],
      "copy-up drops the owner"),
    M("unionfs/copyup.py", "    copy_xattrs(src_layer, src, dst_layer, dst, xattr_names)\n    if not stat.S_ISLNK",
      "    if not stat.S_ISLNK",
      ["tests/test_core.py::test_write_copies_up_with_metadata"],
      "copy-up drops the xattrs"),
    M("unionfs/copyup.py", "        dst_layer.chmod(dst, stat.S_IMODE(st.st_mode), follow_symlinks=True)",
      "        pass",
      ["tests/test_core.py::test_write_copies_up_with_metadata"],
      "copy-up drops the mode"),
    M("unionfs/copyup.py",
      "    dst_layer.utime(dst, (st.st_atime_ns, st.st_mtime_ns))\n\n\nclass CopyUp:",
      "\n\nclass CopyUp:",
      ["tests/test_core.py::test_write_copies_up_with_metadata"],
      "copy-up drops the times"),
    # -- through a mount: independent oracles, dead daemons, bad set-ups --------
    M("unionfs/union.py",
      "        self.upper_for(path, META).chmod(path, stat.S_IMODE(mode))",
      "        self.upper_for(path, META)",
      ["tests/test_image_mount.py::test_change_diff_commit_save_load_remount"],
      "chmod through the mount copies up but keeps the old mode"),
    M("unionfs/whiteout.py",
      'OVL_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")',
      'OVL_OPAQUE_XATTRS = ("trusted.overlay.opaqueX", "user.overlay.opaqueX")',
      ["tests/test_reliability_crash.py::test_kill_at_every_syscall_boundary[rmdir-mkdir-opaque-overlay]"],
      "overlay-format opaque dirs use an xattr kernel overlayfs does not know"),
    M("unionfs/mount.py",
      "    r = subprocess.run(cmd, capture_output=True, text=True)",
      "    r = subprocess.run(\"true\" if stale else cmd, capture_output=True, text=True)",
      ["tests/test_reliability_resources.py::test_sigkill_during_busy_io_then_umount"],
      "umount of a dead daemon's mount reports it but leaves the mount"),
    M("unionfs/union.py",
      'raise OSError(errno.ENOTDIR, "not a directory (a symlink?)", work)',
      "raise RuntimeError(work)",
      ["tests/test_reliability_hostile.py::test_symlinked_work_directory_is_not_followed"],
      "a symlinked work directory is refused with a traceback"),
    # -- image digests ----------------------------------------------------------
    M("unionfs/image/oci.py",
      "self.outer = VerifyingReader(blob, digest, what, size, progress)",
      "self.outer = VerifyingReader(blob, None, what, size, progress)",
      ["tests/test_image_store.py::test_oci_blob_recompressed_is_refused_by_the_blob_digest",
       "tests/test_image_store.py::test_docker_25_blob_recompressed_is_refused_by_the_blob_digest"],
      "the compressed blob's digest is not checked"),
    M("unionfs/image/oci.py",
      "diff_id, f\"{what}: diff_id\")",
      "None, f\"{what}: diff_id\")",
      ["tests/test_image_store.py::test_diff_id_mismatch_leaves_store_unchanged"],
      "the layer's diff_id is not checked"),
    M("unionfs/image/dockerarchive.py",
      "if m and \"sha256:\" + m.group(1) != config_digest:",
      "if False:",
      ["tests/test_image_store.py::test_docker_archive_config_digest_mismatch"],
      "a docker-archive config is not checked against its file name"),
    M("unionfs/image/ocilayout.py", "if actual != desc.digest:", "if False:",
      ["tests/test_image_store.py::test_config_digest_mismatch"],
      "an OCI layout's config/manifest blob is not checked against its digest"),
    # -- hostile layer tars -------------------------------------------------------
    M("unionfs/image/unpack.py", "if unsafe_name.startswith(\"/\"):", "if False:",
      ["tests/test_image_unpack.py::test_hostile_entries_are_refused"],
      "absolute entry names are not refused"),
    M("unionfs/image/unpack.py", "if \"..\" in parts:", "if False:",
      ["tests/test_image_unpack.py::test_hostile_entries_are_refused"],
      "entry names with .. are not refused"),
    M("unionfs/image/unpack.py", "if not target or target not in self.nondirs:",
      "if not target:",
      ["tests/test_image_unpack.py::test_hostile_entries_are_refused"],
      "hardlinks to anything but an earlier file of the layer are not refused"),
    M("unionfs/image/unpack.py", "if parts in self.seen:", "if False:",
      ["tests/test_image_unpack.py::test_hostile_entries_are_refused"],
      "duplicate entries are not refused"),
    M("unionfs/image/unpack.py",
      "_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
      "_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC",
      ["tests/test_image_unpack.py::test_hostile_entries_are_refused",
       "tests/test_image_unpack.py::test_nothing_written_through_a_symlink"],
      "unpacking follows a symlink in an entry's parent path"),
    # -- device nodes ---------------------------------------------------------------
    M("unionfs/image/unpack.py",
      "os.mknod(name, 0o600 | kind, os.makedev(ti.devmajor, ti.devminor), dir_fd=pfd)",
      "raise PermissionError(\"mutant\")",
      ["tests/test_image_unpack.py::test_device_nodes"],
      "device nodes are never created, even as root"),
    M("unionfs/image/unpack.py", "os.makedev(ti.devmajor, ti.devminor)",
      "os.makedev(ti.devminor, ti.devmajor)",
      ["tests/test_image_unpack.py::test_device_nodes"],
      "device nodes get the wrong major/minor"),
    # -- the demo image -------------------------------------------------------------
    M("scripts/make_demo_image.py", '    delete.whiteout("app/config.ini")', "    pass",
      ["tests/test_image_demo.py::test_demo_image_is_deterministic_and_layered"],
      "the demo image's delete layer has no whiteout"),
    # -- entry points -----------------------------------------------------------------
    M("unionfs/fuse_cli.py", "        mount(spec, positional[-1], foreground=foreground, debug=debug)\n",
      "        pass\n",
      ["tests/test_mount.py::test_mount_through_mount_fuse"],
      "fuse-unionfs exits at once without mounting"),
    M("unionfs/cli.py", "    code = report_errors(PROG, args.func, args)\n", "    code = 0\n",
      ["tests/test_mount.py::test_merged_view_copy_up_whiteout_opaque"],
      "unionfs does nothing and claims success"),
    # -- registry push/pull ---------------------------------------------------------
    M("unionfs/registry/pull.py",
      "info = staging.import_layer(open_blob, digest, desc.size, diff_id, what, task)",
      "info = staging.import_layer(open_blob, None, desc.size, diff_id, what, task)",
      ["tests/test_registry.py::test_a_blob_recompressed_on_the_registry_is_refused_by_its_digest"],
      "pull does not verify a blob's digest while streaming it"),
    M("unionfs/registry/pull.py", "        finally:\n            staging.cleanup()",
      "        finally:\n            pass",
      ["tests/test_registry.py::test_a_corrupted_blob_on_the_registry_is_refused_and_the_store_is_unchanged",
       "tests/test_registry.py::test_a_connection_lost_mid_layer_is_retried_then_fails_with_the_store_unchanged"],
      "a failed pull leaves its partial image in the store"),
    M("unionfs/registry/push.py",
      "if client.request(\"HEAD\", blob_path, scopes, what=what, missing_ok=True).status_code == 200:",
      "if client.request(\"HEAD\", blob_path, scopes, what=what, missing_ok=True).status_code == 999:",
      ["tests/test_registry.py::test_image_id_and_layers_survive_push_and_pull_and_a_second_push_uploads_nothing"],
      "push uploads blobs the registry already has"),
    M("unionfs/registry/auth.py",
      "fd, tmp = tempfile.mkstemp(dir=d, prefix=\".auth.json-\")",
      "fd, tmp = tempfile.mkstemp(dir=d, prefix=\".auth.json-\"); os.fchmod(fd, 0o644)",
      ["tests/test_registry_unit.py::test_auth_file_round_trip_and_docker_config"],
      "the auth file is written readable by others (not 0600)"),
    # -- unionfs run ------------------------------------------------------------------
    M("unionfs/container/rootfs.py",
      "resolve = (RESOLVE_IN_ROOT if follow else RESOLVE_NO_SYMLINKS) | RESOLVE_NO_MAGICLINKS",
      "resolve = (0 if follow else RESOLVE_NO_SYMLINKS) | RESOLVE_NO_MAGICLINKS",
      ["tests/test_container_config.py::test_paths_resolve_inside_the_root",
       "tests/test_container_run.py::test_hostile_passwd_symlink_is_resolved_inside",
       "tests/test_container_run.py::test_hostile_links_never_reach_the_host"],
      "run's in-rootfs path resolution follows a symlink out of the rootfs"),
    M("unionfs/container/lifecycle.py",
      "mount_container(c, [record.path(c, \"init\")] + store.lowerdirs(store.image(c.image)), mnt, options)",
      "mount_container(c, store.lowerdirs(store.image(c.image)), mnt, options)",
      ["tests/test_container_run.py::test_diff_shows_only_what_the_process_changed"],
      "run does not mount the init layer (mount points land in the upper and diff)"),
    M("unionfs/container/commands.py", "        print(c.name, flush=True)\n    return code\n",
      "        print(c.name, flush=True)\n    return 0\n",
      ["tests/test_container_run.py::test_image_defaults_and_exit_status"],
      "run does not pass on the container's exit status"),
    M("unionfs/container/monitor.py", "        network.detach(record.path(c, \"net\"))",
      "        pass",
      ["tests/test_run_network.py::test_rm_f_stops_the_network_helper"],
      "rm -f (any clean-up) leaves the network helper running"),
    # -- fidelity: inode numbers, hard links, metacopy, id mapping -----------------------
    M("unionfs/copyup.py", "                    recorded = inodes.record_ino(work, tmp, *record)",
      "                    recorded = False",
      ["tests/test_fidelity.py::test_inode_numbers_survive_copy_up_rename_and_remount[unionfs]"],
      "a file's copy-up does not keep its st_ino (no origin record)"),
    M("unionfs/copyup.py", "        for name in lower_names:\n",
      "        for name in lower_names[:0]:\n",
      ["tests/test_fidelity.py::test_lower_hard_links_survive_copy_up_and_remount[unionfs]"],
      "a hard link's copy-up links only the name written to"),
    M("unionfs/union.py", "        if data is META and not self.metacopy:",
      "        if data is META:",
      ["tests/test_core.py::test_metacopy_copies_metadata_only_until_the_data_changes",
       "tests/test_fidelity.py::test_chown_and_chmod_of_a_64_mib_tree_copy_metadata_only[unionfs]"],
      "metacopy=on copies the data on a metadata change anyway"),
    M("unionfs/union.py",
      "        elif data is not META and self.lower_data(path, node) is not None:",
      "        elif False:",
      ["tests/test_core.py::test_metacopy_copies_metadata_only_until_the_data_changes"],
      "a metacopy's first write does not copy its data up"),
    M("unionfs/union.py", "            uid, gid = self.ids.stored_uid(uid), self.ids.stored_gid(gid)",
      "            pass",
      ["tests/test_fidelity.py::test_id_mapping_shown_and_stored"],
      "chown through an id-mapped mount stores the shown ids, not the mapped-back ones"),
    # -- watching copy-on-write ---------------------------------------------------------
    M("unionfs/control.py", "                if uid != self.owner:", "                if False:",
      ["tests/test_watch.py::test_the_control_socket_serves_only_the_mounts_owner"],
      "the control socket serves any user (SO_PEERCRED not checked)"),
    M("unionfs/namespace.py", "            u.copyup.observer.whiteout(path)",
      "            pass",
      ["tests/test_watch.py::test_the_core_reports_copy_ups_whiteouts_and_opaque_dirs"],
      "no event for a whiteout made by unlink/rmdir"),
    # -- store layout, root mount defaults ------------------------------------------------
    M("unionfs/image/store.py", "            tar_from = LAYER_TAR_COPY\n",
      "            tar_from = LAYER_TAR_COPY; self.blobs[digest] = blob_tmp; "
      "open(blob_tmp, \"wb\").write(gzip.open(copy_tmp).read())\n",
      ["tests/test_image_store_layout.py::test_a_docker_archive_is_kept_unpacked_plus_a_compressed_copy"],
      "the store keeps an uncompressed layer blob again"),
    M("unionfs/mount.py", "ROOT_FUSE_OPTIONS = {\"allow_other\": True, \"suid\": True, \"dev\": True}",
      "ROOT_FUSE_OPTIONS = {\"allow_other\": True}",
      ["tests/test_image_mount.py::test_image_rootfs_allows_its_devices_and_set_id_files_unless_told"],
      "mounts as root lose suid,dev (kernel overlayfs's defaults)"),
    # -- paths of any length: directory descriptors (layers.py) ----------------------
    M("unionfs/layers.py", "_O_DIRFD = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
      "_O_DIRFD = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC",
      ["tests/test_layers_dirfd.py::test_symlinked_component_is_never_followed"],
      "a symlink inside a layer is taken as a directory (descriptors)"),
    M("unionfs/layers.py", "            if gen == self._dirfd_gen:",
      "            if True:",
      ["tests/test_layers_dirfd.py::test_walk_raced_by_an_invalidation_is_not_cached"],
      "a descriptor opened while the upper changed is cached (goes stale)"),
    M("unionfs/layers.py", "            self.upper.forget_dirs(path, tree)",
      "            pass",
      ["tests/test_layers_dirfd.py::test_upper_descriptors_follow_renames_and_removals"],
      "the upper's descriptors are kept after a rename or rmdir"),
]


# -- running ---------------------------------------------------------------------

def checkout_files(root: str) -> list[str]:
    """The files of the checkout: git's tracked and untracked-unignored ones."""
    r = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], capture_output=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"mutants: cannot list the checkout's files: {r.stderr.decode().strip()}")
    return [f for f in r.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]


def copy_checkout(root: str, dest: str):
    for rel in checkout_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target, follow_symlinks=False)


def copy_env(copy: str) -> dict:
    return dict(os.environ, PYTHONPATH=copy + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONDONTWRITEBYTECODE="1")


def check_imports_copy(copy: str, python: str):
    """The venv's python (and so its console scripts) must import the copy."""
    r = subprocess.run([python, "-c", "import unionfs; print(unionfs.__file__)"], cwd="/",
                       env=copy_env(copy), capture_output=True, text=True, timeout=60)
    where = r.stdout.strip()
    if r.returncode != 0 or not where.startswith(copy + os.sep):
        raise SystemExit(f"mutants: the copy is not what gets imported ({where or r.stderr.strip()})")


def run_tests(copy: str, python: str, tests) -> subprocess.CompletedProcess:
    # -o addopts= : the node ids are run even when marked slow.
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
           *tests]
    try:
        return subprocess.run(cmd, cwd=copy, env=copy_env(copy), capture_output=True, text=True,
                              timeout=TEST_TIMEOUT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {TEST_TIMEOUT}s")


def unmount_under(top: str):
    """Lazily unmount whatever a killed test run left mounted below ``top``."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in reversed(points):
        if mp.startswith(top + os.sep):
            cmd = ["umount", "-l", mp] if os.geteuid() == 0 else ["fusermount", "-u", "-z", mp]
            subprocess.run(cmd, capture_output=True, timeout=60)


def apply(copy: str, m: Mutant) -> str:
    """Apply ``m`` to the copy; return the original text to restore."""
    path = os.path.join(copy, m.file)
    with open(path) as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"{m.file}: snippet {m.old!r} occurs {count} times (must be once)")
    mutated = text.replace(m.old, m.new)
    try:
        compile(mutated, path, "exec")
    except SyntaxError as e:
        raise ValueError(f"{m.file}: the mutant does not compile: {e}") from None
    with open(path, "w") as f:
        f.write(mutated)
    return text


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = (r.stdout + r.stderr).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="select", help="only mutants whose description or file contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--python", default=sys.executable, help="the venv's python (default: this one)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)      # progress shows through pipes
    mutants = [m for m in MUTANTS
               if not args.select or args.select in m.what or args.select in m.file]
    if args.list:
        for m in mutants:
            print(f"{m.file}: {m.what}\n    caught by {' '.join(m.tests)}")
        return 0
    if not mutants:
        print("mutants: none selected", file=sys.stderr)
        return 2

    start = time.monotonic()
    survivors, errors = [], []
    tmp = tempfile.mkdtemp(prefix="unionfs-mutants-")
    try:
        os.chmod(tmp, 0o755)                  # tests that run as another user read it
        copy = os.path.join(tmp, "checkout")
        copy_checkout(ROOT, copy)
        check_imports_copy(copy, args.python)

        tests = sorted({t for m in mutants for t in m.tests})
        r = run_tests(copy, args.python, tests)
        if r.returncode != 0:
            print(f"mutants: the named tests fail without any mutant: {last_line(r)}\n"
                  f"{r.stdout[-3000:]}", file=sys.stderr)
            return 2
        print(f"baseline: {len(tests)} named tests pass unmutated ({last_line(r)})")

        for i, m in enumerate(mutants, 1):
            label = f"[{i}/{len(mutants)}] {m.file}: {m.what}"
            t0 = time.monotonic()
            try:
                original = apply(copy, m)
            except ValueError as e:
                errors.append(label)
                print(f"{label}: ERROR {e}")
                continue
            try:
                r = run_tests(copy, args.python, m.tests)
            finally:
                with open(os.path.join(copy, m.file), "w") as f:
                    f.write(original)
            took = time.monotonic() - t0
            if r.returncode == 1:
                print(f"{label}: caught ({last_line(r)}, {took:.0f}s)")
            elif r.returncode == 0:
                survivors.append(label)
                print(f"{label}: SURVIVED ({took:.0f}s)")
            else:                              # collection error, no tests, interrupted
                errors.append(label)
                print(f"{label}: ERROR pytest exit {r.returncode}: {last_line(r)}")
    finally:
        unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{len(mutants)} mutants, {len(mutants) - len(survivors) - len(errors)} caught, "
          f"{len(survivors)} survived, {len(errors)} errors, in {time.monotonic() - start:.0f}s")
    if errors:
        return 2
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
