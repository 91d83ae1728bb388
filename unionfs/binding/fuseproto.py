"""The kernel's FUSE protocol (``linux/fuse.h``, 7.40 and later): opcodes,
capability bits, and the request and reply structures as precompiled
``struct`` layouts. Bytes only: nothing here knows a file or a union.

All structures are little-endian-native as the kernel writes them (the
machines unionfs runs on are little-endian; ``=`` keeps sizes standard and
padding explicit, as in fuse.h).
"""

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45      # the newest this module knows; the kernel may speak less

# -- opcodes (enum fuse_opcode) -------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50
TMPFILE = 51
STATX = 52

OPCODE_NAMES = {v: k for k, v in globals().items()
                if k.isupper() and isinstance(v, int) and k not in (
                    "KERNEL_VERSION", "KERNEL_MINOR_VERSION")}

# -- INIT flags (fuse_init_in/out.flags; bits 32.. travel in flags2) --------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
CREATE_SUPP_GROUP = 1 << 34
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
OVER_IO_URING = 1 << 41

# -- open reply flags (fuse_open_out.open_flags) --------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# -- setattr valid bits (FATTR_*) --------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FSYNC_FDATASYNC = 1

# -- kill-priv flags (with HANDLE_KILLPRIV_V2: remove set-id bits, the caller
# lacks CAP_FSETID) ----------------------------------------------------------------
WRITE_KILL_SUIDGID = 1 << 2          # fuse_write_in.write_flags
OPEN_KILL_SUIDGID = 1 << 0           # fuse_open_in.open_flags (with O_TRUNC)

# -- notifications (fuse_out_header.error of an unsolicited message) ---------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# -- /dev/fuse ioctls (_IOR/_IOW(229, nr, size)) ------------------------------------
_IOC_MAGIC = 229


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (_IOC_MAGIC << 8) | nr


DEV_IOC_CLONE = _ioc(2, 0, 4)               # _IOR(.., 0, uint32_t)
DEV_IOC_BACKING_OPEN = _ioc(1, 1, 16)       # _IOW(.., 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = _ioc(1, 2, 4)       # _IOW(.., 2, uint32_t)

# -- structures ---------------------------------------------------------------------
S = struct.Struct

IN_HEADER = S("=IIQQIIIHH")          # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = S("=IiQ")               # len error unique
INIT_IN = S("=IIIII")                # major minor max_readahead flags flags2 (+ unused)
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = S("=IIIIHHIIHHIIH22x")
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec
# mode nlink uid gid rdev blksize flags
ATTR = "QQQqqqIIIIIIIIII"
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec
# attr_valid_nsec, then the attributes
ENTRY_OUT = S("=QQQQII" + ATTR)
ATTR_OUT = S("=QII" + ATTR)          # attr_valid attr_valid_nsec dummy, attributes
OPEN_OUT = S("=QIi")                 # fh open_flags backing_id
WRITE_OUT = S("=II")
GETXATTR_OUT = S("=II")
STATFS_OUT = S("=QQQQQIII28x")       # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = S("=QQII")                  # ino off namelen type, then the name
DIRENTPLUS_HEAD = S("=QQQQII" + ATTR + "QQII")   # entry_out then dirent

FORGET_IN = S("=Q")
BATCH_FORGET_IN = S("=II")
FORGET_ONE = S("=QQ")
GETATTR_IN = S("=IIQ")               # getattr_flags dummy fh
GETATTR_FH = 1
# valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec
# mode unused uid gid unused
SETATTR_IN = S("=IIQQQqqqIIIIIIII")
MKNOD_IN = S("=IIII")                # mode rdev umask pad
MKDIR_IN = S("=II")                  # mode umask
RENAME_IN = S("=Q")                  # newdir
RENAME2_IN = S("=QII")               # newdir flags pad
LINK_IN = S("=Q")                    # oldnodeid
OPEN_IN = S("=II")                   # flags open_flags
CREATE_IN = S("=IIII")               # flags mode umask open_flags
READ_IN = S("=QQIIQII")              # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN                   # fh offset size write_flags lock_owner flags pad
RELEASE_IN = S("=QIIQ")              # fh flags release_flags lock_owner
FSYNC_IN = S("=QII")                 # fh fsync_flags pad
SETXATTR_IN = S("=II")               # size flags (without SETXATTR_EXT)
GETXATTR_IN = S("=II")               # size pad
ACCESS_IN = S("=II")                 # mask pad
INTERRUPT_IN = S("=Q")
NOTIFY_INVAL_INODE_OUT = S("=Qqq")   # ino off len
NOTIFY_INVAL_ENTRY_OUT = S("=QII")   # parent namelen flags
BACKING_MAP = S("=iIQ")              # fd flags padding

# The smallest read buffer the kernel accepts (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER = 8192


def direntry_size(namelen):
    """Bytes of one READDIR entry with a name of ``namelen`` bytes."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen):
    """Bytes of one READDIRPLUS entry with a name of ``namelen`` bytes."""
    return (DIRENTPLUS_HEAD.size + namelen + 7) & ~7
