"""Builders for image tests: layer tars from short specs, docker-archives
(classic and Docker 25+ style), OCI layouts (dir or tar); and a way to run
the image subcommands as the `unionfs` CLI does."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile


MTIME = 1_700_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- layer tars ---------------------------------------------------------------

def F(name, data=b"", mode=0o644, uid=0, gid=0, mtime=MTIME, xattrs=None):
    ti = _ti(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs)
    ti.size = len(data)
    return ti, data


def D(name, mode=0o755, uid=0, gid=0, mtime=MTIME, xattrs=None):
    return _ti(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs), None


def L(name, target, uid=0, gid=0, mtime=MTIME):
    ti = _ti(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
    ti.linkname = target
    return ti, None


def H(name, target):
    ti = _ti(name, tarfile.LNKTYPE, 0o644, 0, 0, MTIME)
    ti.linkname = target
    return ti, None


def FIFO(name, mode=0o600):
    return _ti(name, tarfile.FIFOTYPE, mode, 0, 0, MTIME), None


def CHR(name, major, minor, mode=0o600):
    ti = _ti(name, tarfile.CHRTYPE, mode, 0, 0, MTIME)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def _ti(name, type_, mode, uid, gid, mtime, xattrs=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, mtime
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    return ti


def layer_tar(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    if how == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(tar)
    return tar


# -- images -------------------------------------------------------------------

def config_for(tars: list[bytes], **extra) -> bytes:
    config = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"} for i in range(len(tars))],
    }
    config.update(extra)
    return json.dumps(config).encode()


def _tar_add(tf, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def docker_archive(path, tars: list[bytes], tags=("test:latest",), style="classic",
                   config: bytes | None = None, blobs: list[bytes] | None = None):
    """A `docker save` tar. style "classic": HEX/layer.tar; "oci": Docker 25+
    (blobs/sha256/HEX, oci-layout, index.json, manifest.json). `blobs`
    replaces what is written for each layer (to corrupt or compress it)."""
    config = config if config is not None else config_for(tars)
    blobs = blobs if blobs is not None else tars
    with tarfile.open(path, "w") as tf:
        if style == "classic":
            config_name = sha(config)[7:] + ".json"
            layer_names = [sha(t)[7:] + "/layer.tar" for t in tars]
        else:
            config_name = "blobs/sha256/" + sha(config)[7:]
            layer_names = ["blobs/sha256/" + sha(b)[7:] for b in blobs]
        for name, blob in zip(layer_names, blobs):
            _tar_add(tf, name, blob)
        _tar_add(tf, config_name, config)
        if style == "oci":
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(b),
                            "size": len(b)} for b in blobs]}).encode()
            _tar_add(tf, "blobs/sha256/" + sha(manifest)[7:], manifest)
            _tar_add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _tar_add(tf, "index.json", json.dumps({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
                 "size": len(manifest), "annotations": {"io.containerd.image.name": "docker.io/library/x:1",
                                                        "org.opencontainers.image.ref.name": "1"}}]}).encode())
        _tar_add(tf, "manifest.json", json.dumps(
            [{"Config": config_name, "RepoTags": list(tags), "Layers": layer_names}]).encode())


def replace_member(path, name: str, data: bytes):
    """Rewrite the tar at `path` with member `name`'s content replaced by
    `data` (to corrupt a blob while keeping the name that claims its digest)."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    assert name in [m.name for m, _ in members], f"{name} is not in {path}"
    with tarfile.open(path, "w") as tf:
        for m, content in members:
            if m.name == name:
                content, m.size = data, len(data)
            tf.addfile(m, io.BytesIO(content) if content is not None else None)


def oci_layout(path, tars: list[bytes], ref="v1", compression="gzip", config: bytes | None = None,
               as_tar=False, blobs: list[bytes] | None = None):
    """An OCI image layout directory (or tar, if `as_tar`)."""
    config = config if config is not None else config_for(tars)
    blobs = blobs if blobs is not None else [compress(t, compression) for t in tars]
    media = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar" + media, "digest": sha(b),
                    "size": len(b)} for b in blobs]}).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
            "size": len(manifest)}
    if ref:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
             "index.json": json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()}
    for b in [config, manifest, *blobs]:
        files["blobs/sha256/" + sha(b)[7:]] = b
    if as_tar:
        with tarfile.open(path, "w") as tf:
            for name, data in files.items():
                _tar_add(tf, name, data)
    else:
        for name, data in files.items():
            p = os.path.join(path, name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)


# -- Debian packages -------------------------------------------------------------

TINY_POSTINST = b"#!/bin/sh\nset -e\necho configuring > /dev/null\necho ok > /var/lib/tiny-configured\n"
TINY_CONTROL = b"""Package: tiny
Version: 1.0
Architecture: all
Maintainer: unionfs tests <tests@example.invalid>
Description: writes to /dev/null from its postinst
"""


def tiny_deb(tmp_path):
    """A .deb whose postinst writes to /dev/null under `set -e`, as many do."""
    pkg = tmp_path / "tiny"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_bytes(TINY_CONTROL)
    (pkg / "DEBIAN/postinst").write_bytes(TINY_POSTINST)
    (pkg / "DEBIAN/postinst").chmod(0o755)
    (pkg / "usr/share/tiny").mkdir(parents=True)
    (pkg / "usr/share/tiny/README").write_text("tiny\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", pkg, tmp_path / "tiny.deb"],
                   check=True, capture_output=True, timeout=60)
    return tmp_path / "tiny.deb"


# -- running commands -----------------------------------------------------------

def run_cli(*argv) -> tuple[int, str, str]:
    """Run `unionfs ARGV` in-process, through the project's CLI: (exit code,
    stdout, stderr)."""
    from unionfs.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def tree(root: str, mtimes=True, owners=True, xattrs=True) -> dict:
    """A comparable description of a directory tree (not following symlinks):
    {path: (type, mode, (uid, gid), mtime, content, xattrs, link group)}, where
    the link group is the first path of the tree's hardlinks to that inode."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(kind):
                content = os.readlink(p)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                content = None
            xa = {}
            if xattrs and not stat.S_ISLNK(kind):
                try:
                    xa = {k: os.getxattr(p, k, follow_symlinks=False)
                          for k in sorted(os.listxattr(p, follow_symlinks=False))
                          if not k.startswith(("trusted.overlay.", "user.overlay.", "security.selinux"))}
                except OSError:
                    xa = {}
            if not stat.S_ISDIR(kind):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = [kind, stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(kind) else None,
                        (st.st_uid, st.st_gid) if owners else None,
                        int(st.st_mtime) if mtimes and not stat.S_ISDIR(kind) else None,
                        content, tuple(xa.items()), None]
    for paths in inodes.values():
        if len(paths) > 1:
            for rel in paths:
                out[rel][-1] = min(paths)
    return {rel: tuple(v) for rel, v in out.items()}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)


def have_mount_api() -> bool:
    try:
        from unionfs.mount import mount  # noqa: F401
        return True
    except ImportError:
        return False


def force_unmount(mnt: str):
    """Unmount `mnt` if something is mounted there (test cleanup)."""
    if not os.path.ismount(mnt):
        return
    try:
        from unionfs.mount import umount
        umount(mnt)
    except Exception:
        pass
    if os.path.ismount(mnt):
        for cmd in (["fusermount", "-u", mnt], ["umount", mnt], ["umount", "-l", mnt]):
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                break


def apply_layers(tars: list[bytes], dest: str):
    """Reference semantics for tests: apply OCI layers (trusted input, whiteout
    entries listed before their siblings) into `dest` with plain tarfile."""
    import shutil

    def remove(p):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            dirs = []
            for m in tf.getmembers():
                parent, _, base = m.name.rstrip("/").rpartition("/")
                target_dir = os.path.join(dest, parent)
                if base == ".wh..wh..opq":
                    for name in os.listdir(target_dir):
                        remove(os.path.join(target_dir, name))
                    continue
                if base.startswith(".wh."):
                    remove(os.path.join(target_dir, base[4:]))
                    continue
                p = os.path.join(dest, m.name)
                if os.path.lexists(p) and not (m.isdir() and os.path.isdir(p)):
                    remove(p)
                tf.extract(m, dest, numeric_owner=True, filter="fully_trusted")
                for key, value in m.pax_headers.items():
                    if key.startswith("SCHILY.xattr."):
                        os.setxattr(p, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"),
                                    follow_symlinks=False)
                if m.issym():
                    os.utime(p, (m.mtime, m.mtime), follow_symlinks=False)
                if m.isdir():
                    dirs.append(m)
            for m in reversed(dirs):  # tarfile sets dir metadata only when extracting all
                p = os.path.join(dest, m.name)
                os.chmod(p, m.mode)
                os.utime(p, (m.mtime, m.mtime))
