"""The FUSE adapter: maps fusepy's high-level calls onto ``Union``.

A protocol adapter only: it unpacks FUSE arguments, asks the union, and packs
the answer. ``OSError`` raised below travels to fusepy, which returns its
errno to the kernel -- errors are translated in that one place.

File handles are the backing file descriptors themselves (``fi.fh``).
"""

import codecs
import os
import stat
import time

import fuse

# UTIME_NOW / UTIME_OMIT as libfuse passes them (tv_sec = 0) with use_ns.
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2

# Merged paths travel as str; names that are not valid UTF-8 must still
# round-trip byte for byte, so decode with surrogateescape like os.fsdecode.
FS_ENCODING = "unionfs-surrogateescape"


def _codec_search(name):
    if name.replace("-", "_") != FS_ENCODING.replace("-", "_"):
        return None
    return codecs.CodecInfo(
        name=FS_ENCODING,
        encode=lambda s, errors="strict": codecs.utf_8_encode(s, "surrogateescape"),
        decode=lambda b, errors="strict": codecs.utf_8_decode(b, "surrogateescape", True),
    )


codecs.register(_codec_search)


def _enable_libfuse_flags():
    """Set the operation-table flags fusepy declares but never sets.

    - ``flag_utime_omit_ok``: without it libfuse2 drops a setattr that changes
      only mtime or only atime (``touch -m``, ``tar x``).
    - ``flag_nullpath_ok``: with ``hard_remove``, calls on an open file whose
      name was unlinked arrive without a path; our handles don't need one.
    """
    lib = fuse._libfuse
    real = getattr(lib, "_unionfs_real_fuse_main", None) or lib.fuse_main_real

    def fuse_main_real(argc, argv, ops_ptr, size, user_data):
        ops_ptr.contents.flag_utime_omit_ok = 1
        ops_ptr.contents.flag_nullpath_ok = 1
        return real(argc, argv, ops_ptr, size, user_data)

    lib._unionfs_real_fuse_main = real
    lib.fuse_main_real = fuse_main_real


_enable_libfuse_flags()


def _attrs(st, ino):
    return {
        "st_mode": st.st_mode, "st_ino": ino, "st_nlink": st.st_nlink,
        "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
        "st_rdev": st.st_rdev, "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


class UnionOperations(fuse.Operations):
    """fusepy operations over a ``Union`` (used with ``raw_fi=True``)."""

    use_ns = True

    def __init__(self, union, on_init=None):
        self.union = union
        self.on_init = on_init

    def __call__(self, op, *args):
        # fusepy's default looks the method up and turns a missing one into
        # EFAULT; ours are all defined, so call straight through.
        return getattr(self, op)(*args)

    def init(self, path):
        if self.on_init is not None:
            self.on_init()

    @staticmethod
    def _owner():
        uid, gid, _ = fuse.fuse_get_context()
        return uid, gid

    # -- attributes -----------------------------------------------------------

    def getattr(self, path, fi=None):
        if path is None:            # an open file whose name is gone
            st = os.fstat(fi.fh)
            return _attrs(st, st.st_ino)
        st, ino = self.union.lstat(path)
        return _attrs(st, ino)

    def access(self, path, amode):
        # Permissions are checked by the kernel (default_permissions); here
        # only existence matters.
        self.union.node(path)
        return 0

    def chmod(self, path, mode):
        self.union.chmod(path, mode)
        return 0

    def chown(self, path, uid, gid):
        self.union.chown(path, uid, gid)
        return 0

    def utimens(self, path, times=None):
        if times is None:
            atime = mtime = None
            now = True
        else:
            atime, mtime = times
            now = False
        if now or atime == _UTIME_NOW or mtime == _UTIME_NOW:
            t = time.time_ns()
            atime = t if now or atime == _UTIME_NOW else atime
            mtime = t if now or mtime == _UTIME_NOW else mtime
        self.union.utimens(path, None if atime == _UTIME_OMIT else atime,
                           None if mtime == _UTIME_OMIT else mtime)
        return 0

    def truncate(self, path, length, fi=None):
        if fi is not None:
            os.ftruncate(fi.fh, length)
        else:
            self.union.truncate(path, length)
        return 0

    def readlink(self, path):
        return self.union.readlink(path)

    def statfs(self, path):
        sv = self.union.statfs()
        return {
            "f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree, "f_bavail": sv.f_bavail, "f_files": sv.f_files,
            "f_ffree": sv.f_ffree, "f_favail": sv.f_favail, "f_namemax": sv.f_namemax,
        }

    # -- xattrs ---------------------------------------------------------------

    def getxattr(self, path, name, position=0):
        return self.union.getxattr(path, name)

    def listxattr(self, path):
        return self.union.listxattr(path)

    def setxattr(self, path, name, value, options, position=0):
        self.union.setxattr(path, name, value, options)
        return 0

    def removexattr(self, path, name):
        self.union.removexattr(path, name)
        return 0

    # -- directories ------------------------------------------------------------

    def opendir(self, path):
        return 0

    def readdir(self, path, fh):
        union = self.union
        _, ino = union.lstat(path)
        out = [(".", {"st_mode": stat.S_IFDIR, "st_ino": ino}, 0),
               ("..", {"st_mode": stat.S_IFDIR, "st_ino": ino}, 0)]
        out.extend((name, {"st_mode": ftype, "st_ino": eino}, 0)
                   for name, ftype, eino in union.listdir(path))
        return out

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0

    def mkdir(self, path, mode):
        self.union.mkdir(path, mode | stat.S_IFDIR, self._owner())
        return 0

    def rmdir(self, path):
        self.union.rmdir(path)
        return 0

    # -- names ----------------------------------------------------------------

    def mknod(self, path, mode, dev):
        self.union.mknod(path, mode, dev, self._owner())
        return 0

    def symlink(self, target, source):
        # fusepy: create `target` whose content is `source`.
        self.union.symlink(target, source, self._owner())
        return 0

    def link(self, target, source):
        # fusepy: create `target` as a new name of existing `source`.
        self.union.link(source, target)
        return 0

    def unlink(self, path):
        self.union.unlink(path)
        return 0

    def rename(self, old, new):
        self.union.rename(old, new)
        return 0

    # -- files ----------------------------------------------------------------

    def open(self, path, fi):
        fd, in_lower = self.union.open(path, fi.flags)
        fi.fh = fd
        if in_lower:
            # Lower files never change while mounted: keep their page cache.
            fi.keep_cache = 1
        elif os.fstat(fd).st_nlink > 1:
            # The kernel caches each *name* of a hard link separately (the
            # high-level API gives every path its own node); bypass its page
            # cache so a write through one name is read through another.
            fi.direct_io = 1
        return 0

    def create(self, path, mode, fi):
        fi.fh = self.union.create(path, mode, fi.flags, self._owner())
        return 0

    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    def write(self, path, data, offset, fi):
        return os.pwrite(fi.fh, data, offset)

    def flush(self, path, fi):
        return 0

    def fsync(self, path, datasync, fi):
        if datasync:
            os.fdatasync(fi.fh)
        else:
            os.fsync(fi.fh)
        return 0

    def release(self, path, fi):
        os.close(fi.fh)
        return 0
