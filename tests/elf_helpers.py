"""A static program small enough to write byte by byte: it exits with its
effective uid (modulo 256), so a test can see whether a set-uid bit took
effect without any compiler or libc inside the image."""

from __future__ import annotations

import platform
import struct

# The machine code of `exit(geteuid())` per architecture, and the ELF machine.
_CODE = {
    # mov eax, 107 (geteuid); syscall; mov edi, eax; mov eax, 60 (exit); syscall
    "x86_64": (0x3E, bytes.fromhex("b86b0000000f0589c7b83c0000000f05")),
    # mov x8, 175 (geteuid); svc 0; mov x8, 93 (exit); svc 0   (x0 carries the result)
    "aarch64": (0xB7, struct.pack("<4I", 0xD28015E8, 0xD4000001, 0xD2800BA8, 0xD4000001)),
}
_BASE = 0x400000            # load address of the one PT_LOAD segment
_EHDR, _PHDR = 64, 56       # sizes of the ELF header and one program header

# What the program exits with when its effective uid is 0, and when it is nobody's.
EXIT_IF_ROOT = 0
EXIT_IF_NOBODY = 65534 % 256


def euid_program() -> bytes | None:
    """The program for this machine, or None where none is written."""
    if platform.machine() not in _CODE:
        return None
    machine, code = _CODE[platform.machine()]
    size = _EHDR + _PHDR + len(code)
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, _BASE + _EHDR + _PHDR, _EHDR, 0, 0,
                          _EHDR, _PHDR, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code
