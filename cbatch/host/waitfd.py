"""Waiting for one descriptor without ``select.select``: select() refuses descriptors >= 1024 (FD_SETSIZE),
and cbatchd, holding every client's connection, pidfds and spool files, runs past that under any descriptor
limit above the old default (this project's CI and systemd's hard limit both allow 20,000+)."""

from __future__ import annotations

import select
import time
from typing import Optional


def readable(fd, timeout: Optional[float] = None) -> bool:
    """Block until ``fd`` (a number or an object with ``fileno()``) is readable, at its end of file or hung up (True), or ``timeout`` seconds have passed
    (False; None waits for ever). A pidfd is readable once its process has exited."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        if poller.poll(left):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
