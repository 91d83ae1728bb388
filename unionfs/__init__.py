"""unionfs: a pure-Python union (copy-on-write) filesystem on FUSE."""

__version__ = "0.1.0"
