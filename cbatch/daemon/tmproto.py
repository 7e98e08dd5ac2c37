"""What the TM relay lets through: the requests of TORQUE's or OpenPBS's TM client, nothing else.

The relay (:mod:`cbatch.daemon.tmrelay`) feeds every byte a container job sends, in order, to its connection's
gate *before* passing it on; :meth:`feed` answers :data:`NEED` (hold: the first request is not complete
yet), :data:`PASS` (send it on) or :data:`BAD` (close the connection). Both clients write DIS ("data is
strings") integers and counted strings; a request starts with the protocol and its version.

- TORQUE 6.1 (``src/lib/Libifl/tm.c`` ``startcom``): a plain byte stream; a request starts ``+5+2``
  (``TM_PROTOCOL`` 5, ``TM_PROTOCOL_VER`` 2), the job id, the cookie, the command. Only the first request
  can be found without parsing every request type, so only it is checked (the relay's own job id, a bounded
  cookie, a command from ``TM_INIT`` to ``TM_FINALIZE``, never ``TM_ADOPT_*`` 113/114); pbs_mom checks job
  id and cookie of each.
- OpenPBS 23.06 (``src/lib/Libifl/tm.c`` ``localmom``/``startcom``, ``src/lib/Libdis/dis_helpers.c``,
  ``src/resmom/mom_main.c`` ``do_tcp``, ``mom_comm.c`` ``tm_request``): the client connects to
  ``localhost:$PBS_MOMPORT`` (pbs_mom's manager port, 15003, where pbs_mom also answers resource-monitor
  requests), sends no authentication there, and frames everything in packets: ``PKTV1\\0``, one type byte
  (left unset by ``dis_puts``: any value), a 4-byte big-endian length, the data. Each request is one packet
  (``dis_flush`` after each), whose data begins ``+2+2`` (``TM_PROTOCOL`` 2, ``TM_PROTOCOL_VER`` 2), the job
  id, the job cookie, the command. So EVERY packet is checked: its length (at most :data:`MAX_PACKET`), the
  TM header, the job id (the relay's own job only), a bounded cookie, a command from ``TM_INIT`` (100) to
  ``TM_FINALIZE`` (112): never ``TM_ATTACH`` (113, ``pbs_attach``: a pid of the container's namespace means
  another process on the host). Bytes of a packet are passed on as they come (memory stays bounded); the
  packet's last byte only after its start was checked, and pbs_mom acts on a packet only when it has all
  of it. A second request packed into the same packet after the first is not parsed (real clients never
  do that; pbs_mom checks its job id and cookie as for any connection from the host's loopback).

Pure: no I/O. Stdlib only.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

NEED, PASS, BAD = "need", "pass", "bad"

TORQUE_HEADER = b"+5+2"     # diswsi(TM_PROTOCOL=5), diswsi(TM_PROTOCOL_VER=2): TORQUE net_connect.h, tm.c
PBS_MAGIC = b"PKTV1\0"      # dis_helpers.c PKT_MAGIC with its NUL (PKT_MAGIC_SZ = sizeof)
PBS_HEAD = len(PBS_MAGIC) + 1 + 4
PBS_TM = b"+2+2"            # diswsi(TM_PROTOCOL=2), diswsi(TM_PROTOCOL_VER=2): OpenPBS net_connect.h, tm.c
PBS_COMMANDS = range(100, 113)      # TM_INIT .. TM_FINALIZE (tm_.h); TM_ATTACH (113) is not relayed
TORQUE_COMMANDS = range(100, 113)   # TM_INIT .. TM_FINALIZE (TORQUE tm_.h); not TM_ADOPT_ALTID/JOBID (113, 114)
MAX_PACKET = 8 << 20        # a TM_SPAWN carries argv and environment (the kernel caps both at 2 MiB)
MAX_COOKIE = 1024           # PBS makes a 32-character hex cookie
MAX_DIGITS = 10             # a DIS number of 32 bits has at most 10 digits


def dis_int(buf: bytes, pos: int) -> Union[str, Tuple[int, int]]:
    """A DIS integer at ``buf[pos:]`` (disrsi_: optional digit counts, then a sign and ``count`` digits):
    ``(value, position after it)`` (negative values negated), or NEED / BAD."""
    count = 1
    for _ in range(4):                  # 1 -> up to 9 -> up to 10 digits: deeper is never a 32-bit number
        if pos >= len(buf):
            return NEED
        c = buf[pos:pos + 1]
        start = pos + 1 if c in (b"+", b"-") else pos
        digits = buf[start:start + count]
        if digits and not digits.isdigit():
            return BAD
        if len(digits) < count:
            return NEED
        if c in (b"+", b"-"):
            return (-int(digits) if c == b"-" else int(digits)), start + count
        if c == b"0":
            return BAD                  # DIS_LEADZRO
        count = int(digits)
        if count > MAX_DIGITS:
            return BAD
        pos = start + len(digits)
    return BAD


def tm_request(data: bytes, job_id: bytes, header: bytes = PBS_TM, commands=PBS_COMMANDS) -> str:
    """Whether ``data`` starts a TM request (``header``, job id, cookie, command) of job ``job_id`` with one of
    ``commands`` (see the module docstring): PASS, NEED (too short to tell) or BAD."""
    n = min(len(data), len(header))
    if data[:n] != header[:n]:
        return BAD
    pos = len(header)
    for field in ("job id", "cookie"):
        got = dis_int(data, pos)
        if not isinstance(got, tuple):
            return got
        size, pos = got
        if field == "job id":
            if size != len(job_id):
                return BAD
            seen = data[pos:pos + size]
            if seen != job_id[:len(seen)]:
                return BAD
        elif not 0 <= size <= MAX_COOKIE:
            return BAD
        if len(data) < pos + size:
            return NEED
        pos += size
    got = dis_int(data, pos)
    if not isinstance(got, tuple):
        return got
    return PASS if got[0] in commands else BAD


def _max_start(job_id: bytes) -> int:
    """The longest request start that can still pass: header, job id, cookie, command (with DIS counts)."""
    return len(PBS_TM) + 3 * 16 + len(job_id) + MAX_COOKIE


class TorqueGate:
    """TORQUE: the first request is one of this job's (see the module docstring); everything after it passes."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id.encode("utf-8", "surrogateescape")
        self.head = b""
        self.opened = False

    def feed(self, data: bytes) -> str:
        """See the module docstring."""
        if self.opened:
            return PASS
        limit = _max_start(self.job_id)
        self.head += data[:limit - len(self.head)]
        verdict = tm_request(self.head, self.job_id, TORQUE_HEADER, TORQUE_COMMANDS)
        if verdict == NEED and len(self.head) >= limit:
            return BAD
        self.opened = verdict == PASS
        return verdict


class PbsGate:
    """OpenPBS: every packet checked (see the module docstring)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id.encode("utf-8", "surrogateescape")
        self.state = "head"
        self.buf = b""
        self.left = 0
        self.opened = False
        self.max_start = _max_start(self.job_id)

    def feed(self, data: bytes) -> str:
        """See the module docstring."""
        i = 0
        while i < len(data):
            if self.state == "head":
                take = data[i:i + PBS_HEAD - len(self.buf)]
                i += len(take)
                self.buf += take
                n = min(len(self.buf), len(PBS_MAGIC))
                if self.buf[:n] != PBS_MAGIC[:n]:
                    return BAD
                if len(self.buf) < PBS_HEAD:
                    continue
                self.left = int.from_bytes(self.buf[len(PBS_MAGIC) + 1:PBS_HEAD], "big")
                if not 0 < self.left <= MAX_PACKET:
                    return BAD
                self.state, self.buf = "request", b""
            elif self.state == "request":
                take = data[i:i + min(self.left, self.max_start - len(self.buf))]
                i += len(take)
                self.left -= len(take)
                self.buf += take
                verdict = tm_request(self.buf, self.job_id)
                if verdict == BAD or (verdict == NEED and (self.left == 0 or len(self.buf) >= self.max_start)):
                    return BAD
                if verdict == PASS:
                    self.opened = True
                    self.state, self.buf = "body", b""
            else:
                skip = min(self.left, len(data) - i)
                i += skip
                self.left -= skip
            if self.state == "body" and self.left == 0:
                self.state = "head"
        return PASS if self.opened else NEED


def gate_for(batch: str, job_id: str):
    """The gate of one relayed connection of a ``batch`` ("torque" | "pbs") job."""
    return PbsGate(job_id) if batch == "pbs" else TorqueGate(job_id)


def describe(batch: Optional[str]) -> str:
    """What the relay passes, for the log."""
    return "OpenPBS TM packets of this job" if batch == "pbs" else "TORQUE TM requests of this job"
