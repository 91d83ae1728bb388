"""Which set-id bits a write, a truncate or a chown removes: the kernel's
rule, applied by the daemon.

The daemon does every change as root, which keeps set-id bits a write by an
ordinary user would clear, so the kernel's rule (Linux 6.x,
``setattr_should_drop_suidgid``) is applied here, for the caller of the
request:

- set-uid is always dropped;
- set-gid is dropped when the file has group-exec, or when the caller is
  neither in the file's group (its fsgid or a supplementary group) nor
  holds CAP_FSETID.

The kernel asks for it (see fs.UnionFS.setattr and write_buf) only when the
caller lacks CAP_FSETID (writes, truncates) or for every chown; so set-uid
needs no question about the caller. Only regular files lose bits.
"""

import stat

CAP_FSETID = 4      # linux/capability.h


def bits_to_drop(mode, file_gid, caller_gid, pid):
    """The set-id bits of a file of ``mode`` and (shown) group ``file_gid``
    that a change by the caller (fsgid ``caller_gid``, process ``pid``)
    removes; 0 if none."""
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID:
        if mode & stat.S_IXGRP:
            drop |= stat.S_ISGID
        elif caller_gid != file_gid:
            groups, fsetid = _caller(pid)
            if file_gid not in groups and not fsetid:
                drop |= stat.S_ISGID
    return drop


def _caller(pid):
    """(supplementary groups, holds CAP_FSETID) of process ``pid``, from
    /proc. A process that cannot be read (gone, another pid namespace)
    counts as in no group and unprivileged: the bit is dropped, the safe
    side of the rule."""
    groups, caps = (), 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups = [int(g) for g in line.split()[1:]]
                elif line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
    except (OSError, ValueError):
        return frozenset(), False
    return frozenset(groups), bool(caps >> CAP_FSETID & 1)
