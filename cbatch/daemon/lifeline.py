"""A client's connection as the lifeline of what it started: one loop for a container's session
(:mod:`cbatch.daemon.supervise`) and a TM task's (:mod:`cbatch.daemon.tasks`).

While the container (or the task) runs, the loop blocks on the connection and on a wake-up descriptor the
waiter writes to the moment the thing it waits for has ended (an exit must never wait for a poll timeout).
A message from the client (``signal``) goes to the caller's handler; descriptors sent along with it are
closed. End of stream or a broken frame while the thing still runs means the client is gone (a SIGKILLed
starter or ``cbatch run``): the caller must then stop what nobody else will.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable, Optional

from cbatch import protocol
from cbatch.core.errors import CbatchError


def serve(conn, wake_fd: int, done: threading.Event, on_message: Callable[[dict], None]) -> Optional[CbatchError]:
    """Hand each of the client's messages to ``on_message`` until ``done`` is set (and ``wake_fd`` becomes
    readable). None when it ended that way; the receive error when the client went away first."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)
    poller.register(wake_fd, select.POLLIN)
    while not done.is_set():
        # Blocks until the client says something (a signal, or EOF when it dies) or the waiter wakes us.
        if not any(fd == conn.fileno() for fd, _ev in poller.poll()):
            continue
        try:
            msg, fds = protocol.recv(conn)
        except CbatchError as exc:
            if done.is_set():
                break
            return exc
        for fd in fds:
            os.close(fd)
        on_message(msg)
    return None
