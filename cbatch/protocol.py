"""cbatchd's wire format: length-prefixed JSON frames, with file descriptors as SCM_RIGHTS.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one object. Every
request carries ``"v": VERSION`` and ``"op"``; replies are ``{"ok": true, ...}`` / ``{"ok": false, "error":
<CbatchError.to_wire()>}``, and the open start/run connection carries ``{"event": ...}`` messages.
Descriptors (the client's stdin, stdout, stderr) ride on the first byte of a frame.

Limits protect the daemon from a bad client: a frame is at most :data:`MAX_MESSAGE` bytes, at most
:data:`MAX_FDS` descriptors, and once a frame has begun its remaining bytes must arrive within
``frame_timeout`` seconds (a peer that trickles a partial frame is dropped).

Stdlib only: the job starter imports this module.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
TYPE_CHECKING = False
if TYPE_CHECKING:     # typing costs the starter memory on every job: annotations only
    from typing import Any, Iterable, List, Optional, Sequence, Tuple

from cbatch.core.errors import DaemonError
from cbatch.host import waitfd

VERSION = 1
MAX_MESSAGE = 1 << 20
MAX_FDS = 3
FRAME_TIMEOUT = 5.0
_HEADER = struct.Struct(">I")


class Closed(DaemonError):
    """The peer closed (or reset) the connection between two frames (not an error by itself)."""

    def __init__(self) -> None:
        super().__init__("daemon", "connection closed")


def _error(problem: str, value: object = None, hint: Optional[str] = None) -> DaemonError:
    return DaemonError("protocol", problem, value, hint)


def encode(obj: dict) -> bytes:
    """One frame for ``obj``. JSON is ASCII-escaped so surrogate-escaped environment bytes survive."""
    if not isinstance(obj, dict):
        raise _error("not an object", type(obj).__name__)
    body = json.dumps(obj, separators=(",", ":")).encode("ascii")
    if len(body) > MAX_MESSAGE:
        raise _error("message too large", f"{len(body)} bytes", f"at most {MAX_MESSAGE} bytes")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    """Send one frame, with ``fds`` (if any) attached to its first byte as SCM_RIGHTS."""
    data = encode(obj)
    if len(fds) > MAX_FDS:
        raise _error("too many descriptors", len(fds), f"at most {MAX_FDS}")
    try:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
            sent = sock.sendmsg([data], anc)
            if sent < len(data):
                sock.sendall(data[sent:])
        else:
            sock.sendall(data)
    except OSError as exc:
        raise DaemonError("daemon", "connection lost while sending", exc.strerror or str(exc)) from exc


def wait_readable(sock, deadline: Optional[float]) -> bool:
    """Wait until ``sock`` (a socket or fd) is readable or ``deadline`` (monotonic) passes; True if readable
    (:func:`cbatch.host.waitfd.readable`: poll, as the daemon holds more than FD_SETSIZE descriptors)."""
    return waitfd.readable(sock, None if deadline is None else max(0.0, deadline - time.monotonic()))


def _wait_readable(sock: socket.socket, deadline: Optional[float]) -> None:
    if not wait_readable(sock, deadline):
        raise _error("timed out", "partial or missing message", "a frame must arrive within its time limit")


def recv(sock: socket.socket, timeout: Optional[float] = None,
         frame_timeout: float = FRAME_TIMEOUT) -> Tuple[dict, List[int]]:
    """Receive one frame: ``(object, fds)``. The caller owns (and must close) the returned fds.

    ``timeout`` bounds the wait for the first byte (None: wait forever); once a frame has begun, the rest
    must arrive within ``frame_timeout`` seconds. Raises :class:`Closed` on a clean end of stream,
    DaemonError for a truncated, oversized, slow or malformed frame. Descriptors are received close-on-exec.
    """
    fds: List[int] = []
    try:
        _wait_readable(sock, None if timeout is None else time.monotonic() + timeout)
        header = b""
        deadline = None
        while len(header) < _HEADER.size:
            if deadline is not None:
                _wait_readable(sock, deadline)
            data, anc, flags, _ = sock.recvmsg(_HEADER.size - len(header),
                                               socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            _take_fds(anc, fds)
            if flags & socket.MSG_CTRUNC:
                raise _error("too many descriptors", "control data truncated", f"at most {MAX_FDS}")
            if not data:
                if not header:
                    raise Closed()
                raise _error("truncated message", f"{len(header)} header bytes")
            header += data
            deadline = deadline or time.monotonic() + frame_timeout
        (size,) = _HEADER.unpack(header)
        if size > MAX_MESSAGE:
            raise _error("message too large", f"{size} bytes", f"at most {MAX_MESSAGE} bytes")
        body = bytearray()
        while len(body) < size:
            _wait_readable(sock, deadline)
            chunk = sock.recv(min(65536, size - len(body)))
            if not chunk:
                raise _error("truncated message", f"{len(body)} of {size} bytes")
            body += chunk
        return decode(bytes(body)), fds
    except ConnectionResetError as exc:
        # A reset is the peer going away (a daemon restart, a killed client): the same as a close, so the
        # callers' reattach / kill-the-container paths see one kind of event.
        for fd in fds:
            os.close(fd)
        raise Closed() from exc
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _take_fds(anc, out: List[int]) -> None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % arr.itemsize])
            out.extend(arr)


def decode(body: bytes) -> dict:
    """Parse a frame body into a dict. DaemonError if it is not a UTF-8 JSON object."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:     # RecursionError: "[[[[..." nesting
        raise _error("malformed message", "not UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise _error("malformed message", "not a JSON object")
    return obj


def request(op: str, **fields: Any) -> dict:
    """A request object for ``op`` with the protocol version."""
    return {"v": VERSION, "op": op, **fields}


def check_version(msg: dict) -> str:
    """Validate ``v`` and ``op`` of a request; return the op. DaemonError naming both versions."""
    v = msg.get("v")
    if v != VERSION or isinstance(v, bool):
        raise DaemonError("protocol", "version mismatch", f"request has v={v!r}, cbatchd speaks v={VERSION}",
                          "use the cbatch client installed with this cbatchd")
    return get_str(msg, "op")


# --- typed field access: a wrong type is "cbatch: request: bad field: <name>" --------------------------

def bad_field(name: str, hint: Optional[str] = None) -> DaemonError:
    """The error for a request field of the wrong type or value."""
    return DaemonError("request", "bad field", name, hint)


_MISSING = object()


def _get(msg: dict, name: str, default: Any):
    value = msg.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise bad_field(name, "missing")
        return default, True
    return value, False


def get_str(msg: dict, name: str, default: Any = _MISSING, *, nul_ok: bool = False) -> Any:
    """A string field (no NUL unless ``nul_ok``)."""
    value, dflt = _get(msg, name, default)
    if dflt:
        return value
    if not isinstance(value, str) or (not nul_ok and "\0" in value):
        raise bad_field(name, "a string")
    return value


def get_int(msg: dict, name: str, default: Any = _MISSING, lo: Optional[int] = None,
            hi: Optional[int] = None) -> Any:
    """An integer field (booleans refused), optionally within ``lo..hi``."""
    value, dflt = _get(msg, name, default)
    if dflt:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        raise bad_field(name, "an integer" + (f" in {lo}..{hi}" if lo is not None and hi is not None else ""))
    return value


def get_bool(msg: dict, name: str, default: Any = _MISSING) -> Any:
    """A boolean field."""
    value, dflt = _get(msg, name, default)
    if dflt:
        return value
    if not isinstance(value, bool):
        raise bad_field(name, "true or false")
    return value


def get_str_list(msg: dict, name: str, default: Any = _MISSING) -> Any:
    """A list of strings (no NUL) as a list."""
    value, dflt = _get(msg, name, default)
    if dflt:
        return value
    if not isinstance(value, list) or not all(isinstance(s, str) and "\0" not in s for s in value):
        raise bad_field(name, "a list of strings")
    return list(value)


def get_pairs(msg: dict, name: str, default: Any = _MISSING) -> Any:
    """An environment: a list of ``[key, value]`` string pairs, order kept, as a tuple of tuples."""
    value, dflt = _get(msg, name, default)
    if dflt:
        return value
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and "\0" not in s for s in p)
            for p in value):
        raise bad_field(name, "a list of [key, value] string pairs")
    return tuple((k, v) for k, v in value)


def env_pairs(env: Iterable[Tuple[str, str]]) -> list:
    """The JSON form of an environment (``os.environ.items()``) for :func:`get_pairs`."""
    return [[str(k), str(v)] for k, v in env]
