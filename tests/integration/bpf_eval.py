"""A classic-BPF interpreter for seccomp programs (tests only): what a filter answers for one system call.

Enough of cBPF for what libseccomp and runc's -ENOSYS stub emit; an instruction it does not know raises, so a
change in the generator shows up as a failing test, not as a silent "allow".
"""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_BIT = 0x40000000
RET_ENOSYS = 0x00050000 | 38


def parse(program: bytes) -> List[Tuple[int, int, int, int]]:
    """``(code, jt, jf, k)`` per 8-byte ``struct sock_filter``."""
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def data(arch: int, nr: int, args: Sequence[int] = (), ip: int = 0) -> bytes:
    """``struct seccomp_data`` for one call."""
    full = (list(args) + [0] * 6)[:6]
    return struct.pack("<iIQ6Q", nr, arch, ip, *full)


def run(insns: List[Tuple[int, int, int, int]], blob: bytes) -> int:
    """The filter's return value for ``blob`` (a :func:`data`)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _step in range(100000):
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:                    # ld [k]
            a = struct.unpack_from("<I", blob, k)[0]
        elif code == 0x00:                  # ld #k
            a = k
        elif code == 0x60:                  # ld M[k]
            a = mem[k]
        elif code == 0x61:                  # ldx M[k]
            x = mem[k]
        elif code == 0x02:                  # st M[k]
            mem[k] = a
        elif code == 0x03:                  # stx M[k]
            mem[k] = x
        elif code == 0x54:                  # and #k
            a &= k
        elif code == 0x07:                  # tax
            x = a
        elif code == 0x87:                  # txa
            a = x
        elif code == 0x05:                  # ja k
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45, 0x1D, 0x2D, 0x3D, 0x4D):
            v = x if code & 0x08 else k
            op = code & 0xF0
            hit = (a == v if op == 0x10 else a > v if op == 0x20 else a >= v if op == 0x30 else bool(a & v))
            pc += jt if hit else jf
        elif code == 0x06:                  # ret #k
            return k
        elif code == 0x16:                  # ret a
            return a
        else:
            raise ValueError(f"instruction {code:#x} at {pc - 1} not known to the test's interpreter")
    raise ValueError("program did not return")
