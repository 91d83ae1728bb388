"""uid/gid mapping between the layers and the mount, as fuse-overlayfs does it.

``uidmapping=ID:HOST:LEN[:ID2:HOST2:LEN2...]`` (and ``gidmapping=``): an id
``ID+k`` (``k < LEN``) *stored* in a layer shows as ``HOST+k`` in the mount,
and an id given through the mount (chown, the owner of a new file) is stored
mapped back. An id no range covers shows as, or is stored as, the overflow
id (``/proc/sys/kernel/overflowuid``, 65534). Without a mapping for a kind,
ids of that kind pass unchanged.

``squash_to_uid=N``, ``squash_to_gid=N``, ``squash_to_root``: every entry
*shows* that owner (squash_to_root: 0 for both, unless the other squash
option names one); what is stored is still mapped as above. This is
fuse-overlayfs's ``find_mapping`` order, checked side by side in
tests/test_fidelity.py.
"""


def _overflow(kind):
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


OVERFLOW_UID = _overflow("uid")
OVERFLOW_GID = _overflow("gid")


def parse_ranges(value):
    """``"ID:HOST:LEN[:ID:HOST:LEN...]"`` -> ((stored, shown, length), ...).
    Raises ValueError with a message for the user. Empty fields are
    skipped, as fuse-overlayfs's parser (strtok) does: containers/storage
    passes each mapping with a leading colon (``uidmapping=:0:100:5000``)."""
    parts = [p for p in value.split(":") if p]
    if len(parts) % 3 or not parts:
        raise ValueError("must be ID:HOST:LEN[:ID2:HOST2:LEN2...]")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError("must be ID:HOST:LEN[:ID2:HOST2:LEN2...] of numbers")
    if any(n < 0 or n > 0xFFFFFFFE for n in nums):
        raise ValueError("ids must be between 0 and 4294967294")
    ranges = tuple(tuple(nums[i:i + 3]) for i in range(0, len(nums), 3))
    if any(length == 0 for _, _, length in ranges):
        raise ValueError("a range's LEN must not be 0")
    return ranges


class IdMap:
    """A mount's uid/gid mapping. A plain class: every mount's start loads
    this module, and dataclasses costs several ms to import (inspect, ast)."""
    __slots__ = ("uids", "gids", "squash_uid", "squash_gid", "squash_root")

    def __init__(self, uids=(), gids=(), squash_uid=None, squash_gid=None, squash_root=False):
        self.uids = uids                # (stored, shown, length) ranges; () = no mapping
        self.gids = gids
        self.squash_uid = squash_uid    # int or None
        self.squash_gid = squash_gid
        self.squash_root = squash_root

    @property
    def active(self):
        return bool(self.uids or self.gids or self.squash_root
                    or self.squash_uid is not None or self.squash_gid is not None)

    def shown_uid(self, stored):
        if self.squash_uid is not None:
            return self.squash_uid
        if self.squash_root:
            return 0
        return _map(self.uids, stored, OVERFLOW_UID, 0, 1)

    def shown_gid(self, stored):
        if self.squash_gid is not None:
            return self.squash_gid
        if self.squash_root:
            return 0
        return _map(self.gids, stored, OVERFLOW_GID, 0, 1)

    def stored_uid(self, shown):
        """The uid to store for ``shown``; -1 ("leave it", chown) stays -1."""
        return shown if shown == -1 else _map(self.uids, shown, OVERFLOW_UID, 1, 0)

    def stored_gid(self, shown):
        return shown if shown == -1 else _map(self.gids, shown, OVERFLOW_GID, 1, 0)

    def stored_owner(self, owner):
        """(uid, gid) a caller ``owner`` (as the mount shows ids) is stored as."""
        return self.stored_uid(owner[0]), self.stored_gid(owner[1])


def _map(ranges, ident, overflow, src, dst):
    """``ident`` through ``ranges`` from column ``src`` to ``dst``."""
    if not ranges:
        return ident
    for r in ranges:
        if r[src] <= ident < r[src] + r[2]:
            return r[dst] + ident - r[src]
    return overflow
