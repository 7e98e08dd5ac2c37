"""An interactive job's terminal, proxied between the job's pty (pbs_mom's, handed over by the starter) and
a container started with a tty (the engine's raw attach stream).

While the container runs, the host pty is put in raw mode: line editing, echo and ^C/^Z/^\\ become the
container's terminal's business (its own pty generates SIGINT for its foreground job), exactly as ``docker
run -it`` does on a user's terminal. The window size follows the host pty: at the start and on every
SIGWINCH the starter forwards (the kernel sends it to the starter's process group when qsub resizes).
The terminal's settings are restored when the session ends. Stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import tty
from typing import Optional, Tuple

from cbatch.daemon.streams import Stoppable

_CHUNK = 65536


def window_size(fd: int) -> Optional[Tuple[int, int]]:
    """``(rows, cols)`` of the terminal ``fd``, or None when it is not a terminal (or has no size yet)."""
    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def make_raw(fd: int):
    """Put the terminal ``fd`` in raw mode; return its previous settings for :func:`restore` (None if not
    a terminal)."""
    try:
        saved = termios.tcgetattr(fd)
        tty.setraw(fd, termios.TCSANOW)
    except (OSError, termios.error):
        return None
    return saved


def restore(fd: int, saved) -> None:
    """Put back the settings :func:`make_raw` saved (the terminal may be gone: ignored)."""
    if saved is None:
        return
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    except (OSError, termios.error):
        pass


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TtyPump(Stoppable):
    """Copies bytes both ways between the job's terminal and the container's raw attach socket, with the
    life rules of :class:`cbatch.daemon.streams.Stoppable`, on its own non-blocking open of the terminal
    (never the client's descriptor number). Construct it in the
    session's thread, :meth:`run` it in another."""

    def __init__(self, sock, tty_fd: int) -> None:
        if fcntl.fcntl(tty_fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            # Reopen only with the access the client's own descriptor grants (root must not gain any).
            raise OSError("the job's terminal descriptor is not open for reading and writing")
        super().__init__()
        self.sock = sock
        try:
            self.fd = os.open(f"/proc/self/fd/{tty_fd}", os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            self.close()
            raise
        self._opened.append(_Fd(self.fd))

    def run(self) -> None:
        """Until the container's side closes (it exited) or :meth:`stop`. The terminal's end of input (a
        hung-up pty) closes the container's stdin."""
        sock, fd = self.sock, self.fd
        sock.setblocking(True)
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for ready, _ev in poller.poll():
                if ready == self._stop_r:
                    return
                if ready == fd:
                    try:
                        data = os.read(fd, _CHUNK)
                    except (InterruptedError, BlockingIOError):
                        continue
                    except OSError:          # EIO: every terminal-side descriptor is closed (qsub went away)
                        data = b""
                    if not data:
                        poller.unregister(fd)
                        _shut_write(sock)
                        continue
                    try:
                        sock.sendall(data)
                    except OSError:
                        return
                else:
                    try:
                        data = sock.recv(_CHUNK)
                    except InterruptedError:
                        continue
                    except OSError:
                        data = b""
                    if not data or not self._write_all(data):
                        return

    def _write_all(self, data: bytes) -> bool:
        """Write to the terminal; False when stopped while the terminal would not take more."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except BlockingIOError:
                waiter = select.poll()
                waiter.register(self.fd, select.POLLOUT)
                waiter.register(self._stop_r, select.POLLIN)
                if any(r == self._stop_r for r, _ev in waiter.poll()):
                    return False
            except OSError:          # the terminal is gone: drop the output, keep draining the container
                return True
        return True


def _shut_write(sock) -> None:
    import socket
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
