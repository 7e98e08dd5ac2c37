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


def pump(sock, tty_fd: int) -> None:
    """Copy bytes both ways between ``tty_fd`` and the container's raw attach socket until the container's
    side closes (it exited). The terminal's end of input (a hung-up pty) closes the container's stdin."""
    sock.setblocking(True)
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    poller.register(tty_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        for fd, _ev in poller.poll():
            if fd == tty_fd:
                try:
                    data = os.read(tty_fd, _CHUNK)
                except InterruptedError:
                    continue
                except OSError:          # EIO: every terminal-side descriptor is closed (qsub went away)
                    data = b""
                if not data:
                    poller.unregister(tty_fd)
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
                if not data:
                    return
                _write_all(tty_fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:          # the terminal is gone: drop the output, keep draining the container
            return


def _shut_write(sock) -> None:
    import socket
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
