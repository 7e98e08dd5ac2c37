"""The stdlib-only client of cbatchd, used by the job starter, the hooks, ``cbatch run`` and ``cbatch local``.

:func:`call` is one request, one reply. :func:`run_session` is the long conversation of a job start or a
``cbatch run``: send the request with our stdin/stdout/stderr, forward the signals we receive to the
container, and return the container's exit status. It is the one implementation of that loop; the starter
and ``cbatch run`` both use it.

Stdlib only: the job starter imports this module.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
TYPE_CHECKING = False
if TYPE_CHECKING:     # typing costs the starter memory on every job: annotations only
    from typing import Callable, List, Optional, Sequence

from cbatch import protocol
from cbatch.core.errors import EXIT_CBATCH, CbatchError, DaemonError, from_wire

DEFAULT_SOCKET = "/run/cbatch/cbatchd.sock"
ENV_SOCKET = "CBATCH_SOCKET"
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 120.0          # one request, one reply
START_TIMEOUT = None           # a start may pull an image first (pull: missing): the daemon answers or closes
START_ATTEMPTS = 3             # starts cut by a daemon restart before any container ran are asked again
REATTACH_EVERY = 0.5
# How long a start waits for a cbatchd that is not listening (a restart between the prologue's register and
# the starter, on a loaded node several seconds). The epilogue waits as long (hooks.UNREGISTER_RETRY).
START_UNREACHABLE_FOR = 20.0
# How long a client keeps trying to reach a cbatchd that went away (restart, upgrade, crash) while its
# container may still run. Bounded, so a node whose daemon never returns does not hold jobs forever; long
# enough for a daemon restart that waits for the engine (recovery retries the engine for up to 10 min).
REATTACH_FOR = 900.0
# Signals a job may receive from pbs_mom/slurmd or a terminal that mean something to the job itself.
# SIGWINCH: an interactive job's terminal was resized (the daemon resizes the container's; ignored otherwise).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT,
             signal.SIGWINCH)


def exec_dispositions() -> None:
    """Before exec'ing a job natively: Python ignores SIGPIPE and SIGXFSZ for itself at start-up, and an
    ignored signal survives exec - the job must get the default, as without cbatch (``yes | head``)."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)


def not_reachable(path: str) -> DaemonError:
    """The one message for "cannot talk to cbatchd"."""
    return DaemonError("daemon", "not reachable", path, "is cbatchd running? cbatch check --node")


def socket_path(explicit: Optional[str] = None, config_path: Optional[str] = None) -> str:
    """The daemon socket a user-run command talks to: ``--socket``, else ``$CBATCH_SOCKET``, else the
    ``daemon.socket`` of ``config_path`` when given, else the default. A user-chosen path is harmless:
    every decision is the daemon's (a fake daemon could only lie to its own caller). Root hooks do not
    use this: they take the socket only from their own shim."""
    if explicit:
        return explicit
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    if config_path:
        from cbatch.core import config     # yaml: only for the admin commands that name a config
        return config.load(config_path).daemon.socket
    return DEFAULT_SOCKET


def connect(path: str = DEFAULT_SOCKET, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Connect to cbatchd's unix socket. DaemonError "not reachable" if nobody answers.

    A full listen backlog (EAGAIN: someone floods the socket with connections) is retried until ``timeout``:
    the daemon drains its backlog quickly, and a hook or starter must not fail on a moment's flood."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
            return sock
        except BlockingIOError as exc:
            sock.close()
            if time.monotonic() + pause >= deadline:
                raise not_reachable(path) from exc
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        except OSError as exc:
            sock.close()
            raise not_reachable(path) from exc


def _reply(msg: dict) -> dict:
    if msg.get("ok") is False:
        err = msg.get("error")
        raise from_wire(err if isinstance(err, dict) else {})
    return msg


def call(path: str, op: str, _fds: Sequence[int] = (), _timeout: float = REPLY_TIMEOUT, **fields) -> dict:
    """Send one ``op`` request and return the reply dict; an error reply is raised as its CbatchError."""
    sock = connect(path)
    try:
        protocol.send(sock, protocol.request(op, **fields), _fds)
        try:
            msg, fds = protocol.recv(sock, timeout=_timeout)
        except protocol.Closed as exc:
            raise DaemonError("daemon", "closed the connection without a reply", op) from exc
        for fd in fds:
            os.close(fd)
        return _reply(msg)
    finally:
        sock.close()


class _Signals:
    """Catch the forwarded signals and wake a poll loop through a pipe (signal.set_wakeup_fd).

    Handlers only record the signal; the loop sends it to the daemon, so a signal never interleaves a
    frame the loop is writing.
    """

    def __init__(self) -> None:
        self.pending: List[int] = []
        self.got_term = False
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.old = {}
        self.old_wakeup = signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        for sig in FORWARDED:
            self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.pending.append(signum)
        if signum == signal.SIGTERM:
            self.got_term = True

    def drain(self) -> List[int]:
        """Signals received since the last call, in order."""
        try:
            while os.read(self.rfd, 256):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        out, self.pending = self.pending, []
        return out

    def restore(self) -> None:
        """Put the previous handlers back (before exec, or when the session is over)."""
        for sig, old in self.old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self.old_wakeup)
        os.close(self.rfd)
        os.close(self.wfd)


class _Session:
    def __init__(self, path: str, request: dict, fds: Sequence[int], sigs: _Signals) -> None:
        self.path, self.request, self.fds, self.sigs = path, request, list(fds), sigs
        self.sock: Optional[socket.socket] = None
        self.started: Optional[dict] = None
        self.queued: List[int] = []

    def forward(self) -> None:
        self.queued.extend(self.sigs.drain())
        if self.started is None or self.sock is None:
            return      # not started yet: the signals wait until there is a container to send them to
        while self.queued:
            protocol.send(self.sock, protocol.request("signal", signum=int(self.queued[0])))
            self.queued.pop(0)

    def next_message(self, timeout: Optional[float]) -> dict:
        """The next message from the daemon, forwarding signals while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.forward()
            if self._readable(deadline):
                msg, fds = protocol.recv(self.sock)
                for fd in fds:
                    os.close(fd)
                return _reply(msg)
            if deadline is not None and time.monotonic() >= deadline:
                raise DaemonError("daemon", "no answer", self.request.get("op"),
                                  f"cbatchd did not answer within {timeout:.0f} s")

    def _readable(self, deadline: Optional[float]) -> bool:
        import select
        p = select.poll()
        p.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        p.register(self.sigs.rfd, select.POLLIN)
        left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        try:
            events = p.poll(left)
        except InterruptedError:
            return False
        return any(fd == self.sock.fileno() for fd, _ in events)

    def reattach(self, started: Optional[dict]) -> str:
        """After losing the daemon (restart), reconnect and ask for our container again: by its id, or (a
        start cut before the daemon told us the id: ``started`` None) as ourselves. Returns ``attached``
        (``self.started`` is then the reply), ``refused`` (the daemon is back and has no container for us:
        it removed it, or none was made) or ``unreachable`` (no daemon within :data:`REATTACH_FOR`)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        fields = {"job_id": started.get("job_id"), "id": started.get("id")} if started else {}
        until = time.monotonic() + REATTACH_FOR
        while time.monotonic() < until:
            try:
                sock = connect(self.path, timeout=REATTACH_EVERY)
            except DaemonError:
                self.queued.extend(self.sigs.drain())
                time.sleep(REATTACH_EVERY)
                continue
            try:
                protocol.send(sock, protocol.request("attach", **fields), self.fds)
                msg, fds = protocol.recv(sock, timeout=REPLY_TIMEOUT)
            except CbatchError:
                # No reply: e.g. we reached the dying daemon's listen backlog and were reset. Try again.
                sock.close()
                self.queued.extend(self.sigs.drain())
                time.sleep(REATTACH_EVERY)
                continue
            for fd in fds:
                os.close(fd)
            try:
                reply = _reply(msg)
            except CbatchError as exc:
                sock.close()
                if exc.problem == "not ready":      # the daemon is still recovering (engine not back)
                    time.sleep(REATTACH_EVERY)
                    continue
                return "refused"
            self.sock = sock
            self.started = dict(started or {}, **{k: reply[k] for k in ("id", "job_id") if k in reply})
            return "attached"
        return "unreachable"


def _connect_for_start(path: str) -> socket.socket:
    """Connect for a start; a daemon that is not listening (restarting) is waited for, bounded."""
    try:
        return connect(path)
    except DaemonError:
        if not _wait_for_daemon(path, START_UNREACHABLE_FOR):
            raise
        return connect(path)


def _wait_for_daemon(path: str, seconds: float) -> bool:
    """Until the daemon answers a ping again (it listens only after its start-up recovery; a bare connect
    could still land in the dying daemon's listen backlog)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            call(path, "ping", _timeout=REATTACH_EVERY * 4)
            return True
        except CbatchError:
            time.sleep(REATTACH_EVERY)
    return False


def run_session(path: str, request: dict, fds: Sequence[int] = (0, 1, 2),
                on_native: Optional[Callable[[List[int]], None]] = None,
                err=None, reraise_term: bool = False) -> int:
    """Run one start/run conversation with cbatchd and return the exit status to exit with.

    ``request`` is a :func:`protocol.request` dict; ``fds`` travel with it. The daemon answers
    ``{"ok": true, "mode": "native"}`` (then ``on_native(pending_signals)`` is called with the signal
    handlers restored; it is expected to exec) or ``{"event": "started"}`` followed by ``{"event": "exit"}``.
    While the container runs, SIGTERM/INT/HUP/USR1/USR2/CONT are forwarded to it. If the daemon goes away
    (restart) at any moment, even before it told us the container's id, we reconnect and ``attach`` for up
    to :data:`REATTACH_FOR` seconds; we never claim the container stopped unless the daemon says so. The exit event's message, if
    any, is printed to ``err`` (stderr). With ``reraise_term`` (the job starter), if we received SIGTERM
    ourselves (qdel) and the container is gone, we re-raise SIGTERM on ourselves so the batch system records
    "killed by SIGTERM" exactly as for a job without cbatch (Torque: exit_status 271). Without it (``cbatch
    run``), the command's own status is returned, as if it had run directly and handled the signal.
    Errors are raised as CbatchError.
    """
    err = err or sys.stderr
    sigs = _Signals()
    restored = False
    s = _Session(path, request, fds, sigs)
    try:
        first = None
        for attempt in range(START_ATTEMPTS):
            s.sock = _connect_for_start(path)
            protocol.send(s.sock, request, fds)
            try:
                first = s.next_message(START_TIMEOUT)
                break
            except protocol.Closed as exc:
                # The daemon went away mid-start (a restart). It recorded the start before asking the engine,
                # so its successor adopted any container that ran for us: take it back as ourselves. If none
                # ran, the successor released the start: ask again.
                outcome = s.reattach(None) if _wait_for_daemon(path, REATTACH_FOR) else "unreachable"
                if outcome == "attached":
                    first = {"event": "started", **s.started}
                    break
                if outcome == "unreachable" or attempt + 1 == START_ATTEMPTS:
                    raise DaemonError("daemon", "closed the connection without a reply", request.get("op"),
                                      None if outcome == "refused" else
                                      f"cbatchd did not come back within {REATTACH_FOR:.0f} s") from exc
        if first.get("mode") == "native":
            pending = s.queued + sigs.drain()
            sigs.restore()
            restored = True
            s.sock.close()
            if on_native is None:
                raise DaemonError("daemon", "unexpected reply", "native", "this command needs a container")
            on_native(pending)
            raise DaemonError("daemon", "native start returned", request.get("op"))
        if first.get("event") != "started":
            raise DaemonError("daemon", "unexpected reply", str(first)[:200])
        s.started = first
        while True:
            try:
                msg = s.next_message(None)
            except DaemonError:
                # Closed, truncated or reset: the daemon went away before telling us the exit status.
                outcome = s.reattach(s.started)
                if outcome == "refused":
                    raise DaemonError("daemon", "lost the job's container", str(s.started.get("id"))[:12],
                                      "cbatchd came back and cannot give it back; it removes such containers") from None
                if outcome == "unreachable":
                    raise DaemonError("daemon", "not reachable", path,
                                      f"cbatchd did not come back within {REATTACH_FOR:.0f} s; the job's "
                                      "container may still run until cbatchd returns and removes it") from None
                continue
            if msg.get("event") == "exit":
                break
        status = msg.get("status")
        status = status if isinstance(status, int) and not isinstance(status, bool) and 0 <= status < 256 \
            else EXIT_CBATCH
        text = msg.get("message")
        if isinstance(text, str) and text:
            err.write(text.rstrip("\n") + "\n")
            err.flush()
        # The daemon closes after removing the container; a short wait keeps "gone" true when we return.
        try:
            s.sock.settimeout(1.0)
            while s.sock.recv(4096):
                pass
        except OSError:
            pass
        s.queued.extend(sigs.drain())
        got_term = sigs.got_term
        sigs.restore()
        restored = True
        if got_term and reraise_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)        # the default action ends us here; the status below is a fallback
            return 128 + signal.SIGTERM
        return status
    finally:
        if s.sock is not None:
            s.sock.close()
        if not restored:
            sigs.restore()
