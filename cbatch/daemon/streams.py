"""A job's stdio: which streams are bind-mounted, and the proxy for the rest (Docker's attach stream).

Stdio choice (:func:`choose_stdio`): a stdout/stderr fd that is a regular file still named by its path is
bind-mounted and appended to by the in-container helper, so the job's output never passes through Python;
anything else (pipe, terminal, deleted file) is proxied through the engine's attach socket by a
:class:`Pump` in a thread.

Docker frames a non-TTY attach stream as an 8-byte header (stream id, 3 zero bytes, big-endian length) then
the payload; the pump copies stdin to the container and each frame to the right fd, live and byte-exact.

Descriptor hygiene (issue #9.2): the client's descriptors are hostile. A pipe it never reads would block a
plain ``write`` forever, and a thread blocked there outlives its session - and once the session closed its
descriptors, the same numbers belong to another session. So the pump never uses the client's descriptor
numbers: it opens its *own* descriptions first (a pipe or terminal is re-opened non-blocking through
``/proc/self/fd``, which leaves the client's file status flags alone; a socket is a dup used with
MSG_DONTWAIT; a regular file is a dup, whose writes never block for long), every wait is a ``poll`` that
also watches a stop pipe, and the pump's descriptors are closed only by :meth:`Pump.close` after the pump
thread has returned. Stdlib only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import struct
from typing import Optional, Sequence

_HEADER = struct.Struct(">BxxxL")   # stream (0 stdin, 1 stdout, 2 stderr), 3 pad bytes, big-endian size
_CHUNK = 65536
_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


def file_path(fd: int, uid: int) -> Optional[str]:
    """The path naming the regular file open as ``fd``, or None (pipe, tty, deleted, renamed, read-only,
    or not owned by ``uid``).

    The path comes from ``/proc/self/fd`` and must still name the same file (device and inode) - otherwise
    the engine would bind-mount something other than what the client handed us. Only the client's own files
    are bind-mounted: a bind mount skips the directory permissions on the way to the file, so a file
    someone else owns is written through the proxy instead.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return None
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return None     # not opened for writing by the client: do not hand it a writable mount
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return None
        lst = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(lst.st_mode) or (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
        return None
    return path


def choose_stdio(fds: Sequence[int], attach_stdin: bool, uid: int):
    """``(engine.Stdio, pump fds (stdin, stdout, stderr))`` for the client's fds 0, 1, 2 (client ``uid``)."""
    from cbatch.engines.base import Stdio

    out = file_path(fds[1], uid) if len(fds) > 1 else None
    err = file_path(fds[2], uid) if len(fds) > 2 else None
    pump = (fds[0] if attach_stdin and fds else None,
            None if out or len(fds) < 2 else fds[1],
            None if err or len(fds) < 3 else fds[2])
    attach = any(fd is not None for fd in pump)
    return Stdio(stdout_path=out, stderr_path=err, attach=attach), pump


class Endpoint:
    """The pump's own descriptor for one of the client's (see the module docstring): non-blocking where a
    peer could stall it. ``read``/``write`` raise BlockingIOError when they would block."""

    def __init__(self, fd: int, writing: bool) -> None:
        self.sock: Optional[socket.socket] = None
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            self.sock = socket.socket(fileno=os.dup(fd))
            self.fd = self.sock.fileno()
        elif stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
            # Root re-opens with exactly the access the client's own descriptor grants: a FIFO handed over
            # write-only must never become readable through us (it may be someone else's, mode 0622).
            accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            if accmode != os.O_RDWR and accmode != (os.O_WRONLY if writing else os.O_RDONLY):
                self.fd = -1            # not usable in this direction: discard output / no input
                return
            flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            try:
                # A new open file description of the same pipe/terminal: O_NONBLOCK on it is ours alone.
                self.fd = os.open(f"/proc/self/fd/{fd}", flags)
            except OSError as exc:
                if exc.errno == errno.ENXIO and writing:
                    self.fd = -1        # a FIFO nobody reads any more: discard
                else:
                    raise
        else:
            self.fd = os.dup(fd)        # regular file, /dev/null: never blocks for long

    def write(self, data) -> int:
        """Write what fits now."""
        if self.sock is not None:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)

    def read(self, n: int) -> bytes:
        """Read what is there now."""
        if self.sock is not None:
            return self.sock.recv(n, socket.MSG_DONTWAIT)
        return os.read(self.fd, n)

    def close(self) -> None:
        """Close our descriptor (idempotent)."""
        if self.sock is not None:
            self.sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd, self.sock = -1, None


def _endpoint(fd: Optional[int], writing: bool, opened: list) -> Optional[Endpoint]:
    if fd is None:
        return None
    ep = Endpoint(fd, writing)
    opened.append(ep)
    return ep if ep.fd >= 0 else None     # None: an output discarded, or stdin at its end at once


class Stoppable:
    """A proxy's life rules: it works only on descriptors it opened itself, waits only in ``poll`` beside a
    stop pipe, and is ended by :meth:`stop`, a join of the thread running it, then :meth:`close` (so no
    descriptor number it uses is closed, or reused, while it may still use it)."""

    def __init__(self) -> None:
        self._opened: list = []          # objects with close(): what the proxy opened
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def stop(self) -> None:
        """Make :meth:`run` return at its next wait (safe from any thread, idempotent)."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Close every descriptor the proxy opened. Only once the thread running it has returned."""
        for ep in self._opened:
            ep.close()
        self._opened = []
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1


class Pump(Stoppable):
    """Copies stdin into the attach socket and demultiplexes its frames onto stdout/stderr until the engine
    closes the stream or :meth:`stop` is called. Construct it in the session's thread (it opens its own
    descriptors there), :meth:`run` it in another, then :meth:`stop`, join that thread, and :meth:`close`."""

    def __init__(self, sock: socket.socket, stdin_fd: Optional[int], stdout_fd: Optional[int],
                 stderr_fd: Optional[int]) -> None:
        super().__init__()
        self.sock = sock
        try:
            self.stdin = _endpoint(stdin_fd, False, self._opened)
            self.out = {1: _endpoint(stdout_fd, True, self._opened), 2: _endpoint(stderr_fd, True, self._opened)}
        except BaseException:
            self.close()
            raise

    def run(self) -> None:
        """The copy loop (see the class docstring). Never blocks anywhere but in ``poll``."""
        sock, stdin = self.sock, self.stdin
        sock.setblocking(False)
        buf = bytearray()
        pending_in = b""                 # stdin bytes not yet in the socket
        out_ep, out_view = None, None    # one frame's payload not yet written (bounded memory)
        stdin_open, sock_open, wr_shut = stdin is not None, True, False
        while True:
            if not stdin_open and not pending_in and not wr_shut:
                _shut_write(sock)        # end of stdin (or none) closes the container's stdin
                wr_shut = True
            while out_view is None and len(buf) >= _HEADER.size:
                stream, size = _HEADER.unpack_from(buf)
                if len(buf) < _HEADER.size + size:
                    break
                ep = self.out.get(stream)
                if ep is not None and size:
                    out_ep, out_view = ep, memoryview(bytes(buf[_HEADER.size:_HEADER.size + size]))
                del buf[:_HEADER.size + size]
            if not sock_open and out_view is None:
                return
            poller = select.poll()
            poller.register(self._stop_r, select.POLLIN)
            sock_events = (_IN if sock_open and out_view is None else 0) | (_OUT if pending_in else 0)
            if sock_events:
                poller.register(sock, sock_events)
            if stdin_open and not pending_in:
                poller.register(stdin.fd, _IN)
            if out_view is not None:
                poller.register(out_ep.fd, _OUT)
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return
            if out_view is not None and out_ep.fd in ready:
                try:
                    out_view = out_view[out_ep.write(out_view):]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:          # the reader went away (EPIPE...): discard this stream from now on
                    self.out = {k: (None if v is out_ep else v) for k, v in self.out.items()}
                    out_view = None
                if out_view is not None and not out_view:
                    out_ep, out_view = None, None
            if stdin_open and not pending_in and stdin.fd in ready:
                try:
                    data = stdin.read(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:          # EIO from a hung-up terminal, ECONNRESET: end of input
                    data = b""
                if data == b"":
                    stdin_open = False
                elif data:
                    pending_in = data
            if sock.fileno() in ready:
                ev = ready[sock.fileno()]
                if pending_in and ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    try:
                        pending_in = pending_in[sock.send(pending_in):]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:      # the container stopped reading for good
                        pending_in, stdin_open = b"", False
                if sock_open and out_view is None and ev & _IN:
                    try:
                        data = sock.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        sock_open = False
                    elif data:
                        buf += data


def say_nowait(fd: int, line: str) -> None:
    """Write one line to the client's ``fd`` if it fits now; dropped otherwise (progress, never blocking)."""
    try:
        ep = Endpoint(fd, writing=True)
    except OSError:
        return
    try:
        if ep.fd >= 0:
            ep.write((line.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        ep.close()


def pump(sock: socket.socket, stdin_fd: Optional[int], stdout_fd: Optional[int],
         stderr_fd: Optional[int]) -> None:
    """Run a :class:`Pump` to the end of the stream in this thread (tests and simple callers).

    End of ``stdin_fd`` (or ``stdin_fd`` None) shuts the socket's write side, which closes the container's
    stdin. A ``None`` output fd discards that stream.
    """
    p = Pump(sock, stdin_fd, stdout_fd, stderr_fd)
    try:
        p.run()
    finally:
        p.close()


def _shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
