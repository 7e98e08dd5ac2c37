"""Docker's attach stream, demultiplexed onto a caller's file descriptors.

Used only when a job's stdio cannot be bind-mounted (a pipe or a terminal: ``cbatch run`` in a pipeline,
interactive stdin). Docker frames a non-TTY attach stream as an 8-byte header (stream id, 3 zero bytes,
big-endian length) then the payload; :func:`pump` copies stdin to the container and each frame to the
right fd, live and byte-exact. Stdlib only: the socket comes from :meth:`cbatch.engines.docker.Engine.attach`.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import struct
from typing import Optional

_HEADER = struct.Struct(">BxxxL")   # stream (0 stdin, 1 stdout, 2 stderr), 3 pad bytes, big-endian size
_CHUNK = 65536


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:     # an O_NONBLOCK pipe handed over by the client: wait, don't drop
            select.select([], [fd], [])
            continue
        view = view[n:]


def pump(sock: socket.socket, stdin_fd: Optional[int], stdout_fd: Optional[int],
         stderr_fd: Optional[int]) -> None:
    """Copy ``stdin_fd`` into the attach socket and demultiplex its frames onto ``stdout_fd``/``stderr_fd``.

    Live and byte-exact; returns when the engine closes the stream (the container's output ended). End of
    ``stdin_fd`` (or ``stdin_fd`` None) shuts the socket's write side, which closes the container's stdin.
    Writes to the socket are non-blocking, so a container that writes without reading never deadlocks
    against us. A ``None`` output fd discards that stream.
    """
    out = {1: stdout_fd, 2: stderr_fd}
    # poll, not epoll: stdin may be a regular file or /dev/null, which epoll refuses.
    sel = selectors.PollSelector()
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ)
    pending = b""
    stdin_open = stdin_fd is not None
    if stdin_open:
        sel.register(stdin_fd, selectors.EVENT_READ)
    else:
        _shut_write(sock)
    buf = bytearray()
    try:
        while True:
            for key, events in sel.select():
                if key.fileobj is sock and events & selectors.EVENT_WRITE:
                    try:
                        pending = pending[sock.send(pending):]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        pending, stdin_open = b"", False    # the container stopped reading for good
                    if not pending:
                        sel.modify(sock, selectors.EVENT_READ)
                        if stdin_open:
                            sel.register(stdin_fd, selectors.EVENT_READ)
                        else:
                            _shut_write(sock)
                if key.fileobj is sock and events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        return
                    buf += data
                    while len(buf) >= _HEADER.size:
                        stream, size = _HEADER.unpack_from(buf)
                        if len(buf) < _HEADER.size + size:
                            break
                        fd = out.get(stream)
                        if fd is not None:
                            _write_all(fd, bytes(buf[_HEADER.size:_HEADER.size + size]))
                        del buf[:_HEADER.size + size]
                elif key.fileobj == stdin_fd:
                    try:
                        data = os.read(stdin_fd, _CHUNK)
                    except InterruptedError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        data = b""
                    # Stop reading stdin until this chunk is out: bounded memory, no deadlock.
                    sel.unregister(stdin_fd)
                    if not data:
                        stdin_open = False
                        if not pending:
                            _shut_write(sock)
                        continue
                    pending = data
                    sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    finally:
        sel.close()


def _shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
