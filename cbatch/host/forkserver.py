"""The fork server: a small root process, started with cbatchd, that forks the children which act as a user.

:mod:`cbatch.host.paths` resolves and opens a job's paths in a child that dropped to the job's user. Forking
the daemon itself for that cost it as much as the child's whole work: the kernel copies the page tables of a
~40 MiB Python process, and after every fork each page the daemon writes again (Python writes reference counts
everywhere) takes a copy-on-write fault (~1,600 per job, measured). This server is a fresh interpreter that
imports only what its children run; it waits for requests and forks, so its children are cheap to make and
nothing in the daemon is write-protected by them.

Protocol, on a ``SOCK_SEQPACKET`` socketpair whose daemon end is close-on-exec (no other process holds it):
one message per request, ``\\0``-separated fields (what :func:`spawn` was given: bytes, never parsed as
JSON or shell) with exactly ONE fd riding on it, the child's end of the request's own socketpair. The server
forks; the child closes the control socket, sends ``P`` with a pidfd of itself on the request socket (the
daemon kills it at its timeout by that pidfd, never by a pid that could have been reused), then runs the
``serve`` function it was started with, which never returns. The server reaps its children (their CPU time
is then its own, and cbatchd's when it ends). It inherits only the control socket (stdin and stdout on
/dev/null, the daemon's stderr) and exits when the daemon's end closes (the daemon ended or restarted).
Stdlib only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
from typing import Callable, List, Optional, Sequence

log = logging.getLogger("cbatchd")

MAX_REQUEST = 256 * 1024        # a request's fields; a longer one is refused (paths batches stay far below)
Serve = Callable[[List[bytes], socket.socket], None]

_lock = threading.Lock()
_ctl: Optional[socket.socket] = None
_proc: Optional[subprocess.Popen] = None


def start(argv: Sequence[str]) -> int:
    """Start the server: ``argv`` plus the number of its end of the control socket (the program runs
    :func:`serve_forever` on it with its ``serve``); returns its pid. A server already running is stopped
    first. It is a fresh interpreter, not a fork of the caller: it holds none of the daemon's fds or memory,
    and a small process forks cheaply."""
    global _ctl, _proc
    stop()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen([*argv, str(child.fileno())], pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    with _lock:
        _ctl, _proc = parent, proc
    return proc.pid


def pid() -> int:
    """The running server's pid (0: none)."""
    return _proc.pid if _ctl is not None and _proc is not None else 0


def stop() -> None:
    """Close our end (the server exits at the EOF) and reap it. Idempotent."""
    global _ctl, _proc
    with _lock:
        ctl, proc, _ctl, _proc = _ctl, _proc, None, None
    if ctl is not None:
        ctl.close()
    if proc is not None:
        proc.wait()


def spawn(fields: Sequence[bytes]) -> Optional[socket.socket]:
    """Ask the server for a child serving ``fields``: our end of the request's socket, or None when there is no
    server (never started, or gone: it is then forgotten and the caller forks itself).

    The child's first message is ``P`` with its pidfd; EOF before it means the server could not fork it."""
    global _ctl
    ctl = _ctl
    if ctl is None:
        return None
    data = b"\0".join(fields)
    if len(data) > MAX_REQUEST or any(b"\0" in f for f in fields):
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        socket.send_fds(ctl, [data], [theirs.fileno()])
    except OSError as exc:
        ours.close()
        log.error("fork server (pid %d) gone (%s): forking children from the daemon itself", pid(), exc)
        with _lock:
            if _ctl is ctl:
                _ctl = None
            if _proc is not None:
                _proc.poll()        # reap it if it died
        return None
    finally:
        theirs.close()
    return ours


def _reap(_signum=None, _frame=None) -> None:  # pragma: no cover - in the server
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def serve_forever(fd: int, serve: Serve, name: bytes = b"cbatchd-fork") -> None:  # pragma: no cover
    """The server's loop on its end ``fd`` of the control socket (the program :func:`start` ran calls this):
    one child per request, running ``serve(fields, sock)`` (which must end with ``os._exit``). Returns at EOF."""
    ctl = socket.socket(fileno=fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Reaped here, not by the kernel (SIGCHLD ignored): their CPU time then counts as ours.
    signal.signal(signal.SIGCHLD, _reap)
    try:
        with open("/proc/self/comm", "wb") as fh:
            fh.write(name[:15])
    except OSError:
        pass
    while True:
        try:
            data, fds, flags, _addr = socket.recv_fds(ctl, MAX_REQUEST + 1, 1)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data and not fds:
            return                  # the daemon's end is closed
        if len(fds) != 1 or len(data) > MAX_REQUEST or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            continue
        try:
            child = os.fork()
        except OSError:
            os.close(fds[0])        # the daemon sees EOF before the pidfd: an error, not a hang
            continue
        if child == 0:
            code = 1
            try:
                ctl.close()
                sock = socket.socket(fileno=fds[0])
                me = os.pidfd_open(os.getpid())
                socket.send_fds(sock, [b"P"], [me])
                os.close(me)
                serve(data.split(b"\0"), sock)
            finally:
                os._exit(code)
        os.close(fds[0])
