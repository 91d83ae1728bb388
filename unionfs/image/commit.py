"""Commit: a container's upper directory -> an OCI layer -> a new image.

The layer tar is deterministic: entries in `changes.walk_upper` order,
owner/mode/mtime (whole seconds) and xattrs as in the upper, empty user and
group names, hardlinks within the layer as link entries to the first name,
whiteouts as `.wh.NAME`, opaque directories as `DIR/.wh..wh..opq`. It is
compressed with gzip at a fixed level and without a timestamp.

The new image's `created` (config and history) is derived from the content:
$SOURCE_DATE_EPOCH if set, else the newest mtime in the layer (or the
parent's `created` for an empty layer). So committing the same upper twice
gives the same layer digest, diff_id and image ID.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import stat
import tarfile
import time

from unionfs.errors import UserError
from unionfs.metacopy import LowerData
from unionfs.image import oci
from unionfs.image.changes import file_xattrs, walk_upper
from unionfs.whiteout import WH_OPAQUE, WH_PREFIX
from unionfs.image.store import Image, Staging, Store
from unionfs.image.unpack import PAX_XATTR_PREFIX

GZIP_LEVEL = 6
WHITEOUT_MODE = 0o644
DEFAULT_CREATED_BY = "unionfs commit"


class _HashingWriter:
    def __init__(self, sink):
        self._sink = sink
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data):
        self.hash.update(data)
        self.count += len(data)
        return self._sink.write(data)

    def flush(self):
        pass


def _tarinfo(name: str, st: os.stat_result, xattrs: dict[str, bytes] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = int(st.st_mtime)
    if xattrs:
        ti.pax_headers = {PAX_XATTR_PREFIX + k: v.decode("utf-8", "surrogateescape")
                          for k, v in xattrs.items()}
    return ti


def _whiteout_tarinfo(name: str, st: os.stat_result) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = WHITEOUT_MODE
    ti.uname = ti.gname = ""
    ti.mtime = int(st.st_mtime)
    return ti


def write_layer(upper: str, out, warn, progress=None, lowers: list[str] = ()) -> int:
    """Write the layer tar of `upper` to the binary stream `out`; return the
    newest mtime in it (0 if empty). `lowers` (top first) hold the data of
    the upper's metacopy files."""
    data = LowerData(lowers)
    first_link: dict[tuple[int, int], str] = {}
    newest = 0
    warned_sockets = False
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for entry in walk_upper(upper):
            name = "/".join(entry.parts)
            st = entry.st
            newest = max(newest, int(st.st_mtime))
            if progress:
                progress.tick()
            if entry.kind == "whiteout":
                parent = "/".join(entry.parts[:-1])
                tf.addfile(_whiteout_tarinfo(_join(parent, WH_PREFIX + entry.parts[-1]), st))
                continue
            mode = st.st_mode
            if stat.S_ISSOCK(mode):
                if not warned_sockets:
                    warn(f'commit: sockets cannot be stored in a layer: skipped "/{name}" and any others')
                    warned_sockets = True
                continue
            ti = _tarinfo(name, st, file_xattrs(entry.upper, entry.path))
            if entry.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                if entry.opaque:
                    tf.addfile(_whiteout_tarinfo(_join(name, WH_OPAQUE), st))
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_link:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_link[key]
                ti.pax_headers = {}
                tf.addfile(ti)
                continue
            if st.st_nlink > 1:
                first_link[key] = name
            if stat.S_ISREG(mode):
                ti.type = tarfile.REGTYPE
                fd = data.open(entry.upper, entry.path)
                with os.fdopen(fd, "rb") as f:
                    ti.size = os.fstat(f.fileno()).st_size
                    tf.addfile(ti, f)
            elif stat.S_ISLNK(mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = entry.upper.readlink(entry.path)
            elif stat.S_ISFIFO(mode):
                ti.type = tarfile.FIFOTYPE
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            if not stat.S_ISREG(mode):
                tf.addfile(ti)
    return newest


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _created(newest: int, parent_config: dict) -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return _rfc3339(int(epoch))
    if newest:
        return _rfc3339(newest)
    return parent_config.get("created") or _rfc3339(0)


def _rfc3339(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def child_config(parent_config: dict, diff_id: str, created: str, created_by: str) -> bytes:
    """The parent's config with one more layer and history entry."""
    config = copy.deepcopy(parent_config)
    config["created"] = created
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("type", "layers")
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [diff_id]
    history = list(config.get("history") or [])
    history.append({"created": created, "created_by": created_by})
    config["history"] = history
    return oci.canonical_json(config)


def commit(store: Store, upper: str, parent: Image, names: list[str], message: str | None,
           warn, progress=None, edit_config=None) -> Image:
    """Store `upper` as a new layer on top of `parent`, as a new image named
    `names`; `edit_config(container_config) -> container_config` changes the
    process config the new image inherits (`commit -c`). Holds the store lock
    throughout."""
    parent_config = json.loads(store.config_bytes(parent))
    if edit_config is not None:
        parent_config["config"] = edit_config(parent_config.get("config") or {})
    with store.locked():
        staging = Staging(store, warn, progress)
        try:
            blob_tmp = os.path.join(staging.dir, "commit-layer")
            if progress:
                progress.phase("commit: writing layer")
            with open(blob_tmp, "wb") as f:
                with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
                    tar_out = _HashingWriter(gz)
                    newest = write_layer(upper, tar_out, warn, progress,
                                         store.lowerdirs(parent))
            diff_id = "sha256:" + tar_out.hash.hexdigest()
            if progress:
                progress.phase(f"commit: storing layer {oci.short(diff_id)}", os.path.getsize(blob_tmp))
            layer = staging.import_layer(lambda: open(blob_tmp, "rb"), None, None, diff_id,
                                         f"commit: layer {oci.short(diff_id)}")
            config_bytes = child_config(parent_config, diff_id, _created(newest, parent_config),
                                        message or DEFAULT_CREATED_BY)
            return store.add_image(staging, config_bytes, parent.layers + [layer], names)
        except OSError as e:
            raise UserError(f"commit: {e.filename or upper}: {e.strerror}") from None
        finally:
            staging.cleanup()
