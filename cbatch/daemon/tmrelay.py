"""The TM relay: a container job's own ``pbsdsh`` reaches the pbs_mom running the job (TORQUE or OpenPBS).

The TM client (libtorque's or OpenPBS's libpbs ``tm_init``) connects to ``localhost:$PBS_MOMPORT``; a
container with network ``none`` has only its own loopback. One :class:`Relay` per container job listens on
``127.0.0.1:<tm port>`` *inside the container's network namespace* and forwards each accepted connection to
``127.0.0.1:<tm port>`` on the host, where pbs_mom checks the job id and job cookie of every request as it
does for a native job.

The listening socket is made by a short-lived thread of its own (:func:`open_listener`): it enters the
container's namespace with ``setns(2)`` (which moves only the calling thread), creates, binds and listens,
and goes back; the socket stays in the container's namespace whoever uses it later. The namespace is opened
through a ``/proc/<pid>`` directory fd whose cgroup names the container, so a recycled pid is never entered.

What the relay lets through (the container is hostile):

- only TM: every byte from the job goes through its connection's gate (:mod:`cbatch.daemon.tmproto`: TORQUE's
  first request header, or every OpenPBS packet with this job's id) before it is passed on; a connection
  whose first request is not TM is closed before the host is connected to, so the job cannot speak the
  mom's resource-monitor or inter-mom protocols through cbatchd. The mom's side comes from an unprivileged
  port of the host's loopback, exactly as a native job's would;
- at most ``torque.tm_max_connections`` connections at once per job (more are accepted and closed at once,
  so the backlog cannot hold them), at most :data:`ACCEPT_RATE` accepts a second, and the first request
  within :data:`HEADER_TIMEOUT` seconds;
- bounded memory: each direction holds at most one read (64 KiB) not yet written.

A :class:`Relay` is a :class:`cbatch.daemon.streams.Stoppable`: started and stopped with the job's session
(:func:`start`/:func:`stop`, called by :mod:`cbatch.daemon.supervise`), re-created when a restarted cbatchd's
client reattaches (the port and the batch system are in the session's record). Stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Optional

from cbatch.core.errors import CbatchError, DaemonError
from cbatch.daemon import streams, tmproto

log = logging.getLogger("cbatchd")
HEADER_TIMEOUT = 10.0       # seconds a connection may take to send the header
ACCEPT_RATE = 20.0          # accepts a second (and burst), per job
CONNECT_TIMEOUT = 5.0       # to pbs_mom on the host's loopback
JOIN = 10.0                 # a stopped relay returns at its next poll; longer means a bug
_CHUNK = 65536
_CLONE_NEWNET = 0x40000000


def open_listener(pid: int, cid: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``127.0.0.1:port`` in the network namespace of ``pid``, the
    init of the container whose cgroup path names ``cid`` (the engine's ``cgroup_name``). Raises DaemonError."""
    result: dict = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = proc = ns = -1
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            cg = os.open("cgroup", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                cgroup = os.read(cg, 65536).decode("ascii", "replace")
            finally:
                os.close(cg)
            if cid not in cgroup:
                raise OSError(errno.ESRCH, "pid is not the container's")
            ns = os.open("ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            if libc.setns(ns, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the container")
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
                    sock.listen(backlog)
                    sock.setblocking(False)
                except BaseException:
                    sock.close()
                    raise
                result["sock"] = sock
            finally:
                # This thread ends right after; if it could not go back it ends anyway, and nothing else
                # ever runs on it (setns moves only the calling thread).
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    log.error("cbatch: TM relay: setns back failed (errno %d): thread ends", ctypes.get_errno())
        except OSError as exc:
            result["error"] = exc
        finally:
            for fd in (own, proc, ns):
                if fd >= 0:
                    os.close(fd)

    thread = threading.Thread(target=work, name=f"tmns-{cid[:12]}", daemon=True)
    thread.start()
    thread.join()
    if "sock" not in result:
        exc = result.get("error")
        raise DaemonError("TM relay", "cannot listen in the container", f"{cid[:12]} port {port}",
                          getattr(exc, "strerror", None) or str(exc)) from exc
    return result["sock"]


class _Conn:
    """One relayed connection: the job's end, pbs_mom's end once the header passed, and what is in flight."""

    def __init__(self, client: socket.socket, deadline: float, gate) -> None:
        self.client = client
        self.gate = gate
        self.mom: Optional[socket.socket] = None
        self.deadline = deadline
        self.head = b""
        self.to_mom = b""            # read from the job, not yet written to the mom
        self.to_client = b""
        self.client_eof = self.mom_eof = False
        self.mom_shut = self.client_shut = False

    def close(self) -> None:
        for s in (self.client, self.mom):
            if s is not None:
                s.close()


class Relay(streams.Stoppable):
    """The relay loop of one container job (see the module docstring). Construct, :meth:`run` in a thread,
    then :meth:`stop`, join, :meth:`close`."""

    def __init__(self, listener: socket.socket, target: tuple, max_connections: int, job_id: str = "",
                 header_timeout: float = HEADER_TIMEOUT, accept_rate: float = ACCEPT_RATE,
                 batch: str = "torque") -> None:
        super().__init__()
        self.listener = listener
        self._opened.append(listener)
        self.target = target
        self.max_connections = max_connections
        self.job_id = job_id
        self.header_timeout = header_timeout
        self.accept_rate = accept_rate
        self.batch = batch                  # which TM the gates check (tmproto.gate_for)
        self.conns: list = []
        self.refused = {"header": 0, "bound": 0, "mom": 0}      # counts, for the log and the tests
        self.relayed = 0

    def run(self) -> None:
        """Accept, check, forward until :meth:`stop`. Waits only in ``poll``."""
        tokens, last = self.accept_rate, time.monotonic()
        try:
            while True:
                now = time.monotonic()
                tokens = min(self.accept_rate, tokens + (now - last) * self.accept_rate)
                last = now
                for c in [c for c in self.conns if c.mom is None and now >= c.deadline]:
                    self._drop(c, "header")
                poller = select.poll()
                poller.register(self._stop_r, select.POLLIN)
                timeout = None
                if tokens >= 1:
                    poller.register(self.listener, select.POLLIN)
                else:
                    timeout = (1 - tokens) / self.accept_rate
                socks = {}
                for c in self.conns:
                    self._register(poller, socks, c)
                    if c.mom is None:
                        left = max(0.0, c.deadline - now)
                        timeout = left if timeout is None else min(timeout, left)
                ready = dict(poller.poll(None if timeout is None else int(timeout * 1000) + 1))
                if self._stop_r in ready:
                    return
                if self.listener.fileno() in ready:
                    tokens -= self._accept()
                for fd, ev in ready.items():
                    if fd in socks:
                        conn, side = socks[fd]
                        if conn in self.conns:
                            self._service(conn, side, ev)
        finally:
            for c in self.conns:
                c.close()
            self.conns = []

    def _register(self, poller, socks: dict, c: _Conn) -> None:
        # A side with nothing to wait for is left out: a hung-up socket would otherwise wake poll at once,
        # again and again, while the other side drains.
        cev = (select.POLLIN if not c.client_eof and not c.to_mom else 0) | (select.POLLOUT if c.to_client else 0)
        if cev:
            poller.register(c.client, cev)
            socks[c.client.fileno()] = (c, "client")
        if c.mom is not None:
            mev = (select.POLLIN if not c.mom_eof and not c.to_client else 0) | (select.POLLOUT if c.to_mom else 0)
            if mev:
                poller.register(c.mom, mev)
                socks[c.mom.fileno()] = (c, "mom")

    def _accept(self) -> int:
        try:
            client, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            log.warning("job %s: TM relay: accept failed: %s", self.job_id, exc)
            return 1
        if len(self.conns) >= self.max_connections:
            self.refused["bound"] += 1
            if self.refused["bound"] in (1, 10, 100, 1000):
                log.warning("job %s: TM relay: connection refused: %d open (torque.tm_max_connections); "
                            "%d refused so far", self.job_id, len(self.conns), self.refused["bound"])
            client.close()
            return 1
        client.setblocking(False)
        self.conns.append(_Conn(client, time.monotonic() + self.header_timeout,
                                tmproto.gate_for(self.batch, self.job_id)))
        return 1

    def _drop(self, c: _Conn, why: Optional[str] = None) -> None:
        if why:
            self.refused[why] += 1
            if self.refused[why] in (1, 10, 100, 1000):
                log.warning("job %s: TM relay: connection closed: %s (%d so far)", self.job_id,
                            {"header": "not a TM request (or none in time)", "mom": "pbs_mom unreachable"}[why],
                            self.refused[why])
        c.close()
        self.conns.remove(c)

    def _service(self, c: _Conn, side: str, ev: int) -> None:
        try:
            if side == "client":
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not c.client_eof and not c.to_mom:
                    data = c.client.recv(_CHUNK)
                    if not data:
                        c.client_eof = True
                    else:
                        verdict = c.gate.feed(data)
                        if verdict == tmproto.BAD:
                            self._drop(c, "header")
                            return
                        if c.mom is None:
                            c.head += data
                            if verdict == tmproto.NEED or not self._connect(c):
                                return
                        else:
                            c.to_mom = data
                if c.to_client and ev & select.POLLOUT:
                    c.to_client = c.to_client[c.client.send(c.to_client):]
            else:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not c.mom_eof and not c.to_client:
                    data = c.mom.recv(_CHUNK)
                    if not data:
                        c.mom_eof = True
                    else:
                        c.to_client = data
                if c.to_mom and ev & select.POLLOUT:
                    c.to_mom = c.to_mom[c.mom.send(c.to_mom):]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if c.mom is None:
            if c.client_eof:
                self._drop(c, "header")
            return
        # A side's end is passed on once everything it sent is delivered; both ended: the pair is done.
        if c.client_eof and not c.to_mom and not c.mom_shut:
            c.mom_shut = _shut(c.mom)
        if c.mom_eof and not c.to_client and not c.client_shut:
            c.client_shut = _shut(c.client)
        if c.client_shut and c.mom_shut:
            self._drop(c)
        elif c.mom_eof and not c.to_client and c.client_eof:
            self._drop(c)

    def _connect(self, c: _Conn) -> bool:
        """Connect to pbs_mom once the gate passed the first request; False when ``c`` was dropped."""
        try:
            mom = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError:
            self._drop(c, "mom")
            return False
        mom.setblocking(False)
        c.mom, c.to_mom, c.head = mom, c.head, b""
        self.relayed += 1
        return True


def _shut(sock: socket.socket) -> bool:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return True


class Running:
    """A started relay and its thread."""

    def __init__(self, relay: Relay, thread: threading.Thread) -> None:
        self.relay, self.thread = relay, thread


def start(daemon, sess) -> Optional[Running]:
    """A running relay for ``sess`` when it has a TM port (see :mod:`cbatch.daemon.tmclient`), else None.
    A relay that cannot start is logged: the job runs on without TM, as it would have before."""
    port = getattr(sess, "tm_port", None)
    if not port:
        return None
    bound = daemon.config.torque.tm_max_connections
    try:
        pid = daemon.engine.container_pid(sess.cid)
        if not pid:
            return None                     # already exited: nothing to relay for
        listener = open_listener(pid, daemon.engine.cgroup_name(sess.cid), port, min(bound, 128))
    except CbatchError as exc:
        try:
            gone = not daemon.engine.running(sess.cid)
        except CbatchError:
            gone = False
        if gone:
            return None                     # exited meanwhile (a short job): nothing to relay for
        log.error("job %s: container %s: no TM relay: %s", sess.job_id, sess.cid[:12], exc.message)
        return None
    batch = getattr(sess, "batch", "torque")
    relay = Relay(listener, ("127.0.0.1", port), bound, sess.job_id, batch=batch)

    def run() -> None:
        try:
            relay.run()
        except Exception as exc:  # noqa: BLE001 - a bug must not take the session with it
            log.error("job %s: TM relay failed: %s", sess.job_id, exc)
    thread = threading.Thread(target=run, name=f"tm-{sess.cid[:12]}", daemon=True)
    thread.start()
    log.info("job %s: container %s: TM relay on 127.0.0.1:%d (at most %d connections; %s)", sess.job_id,
             sess.cid[:12], port, bound, tmproto.describe(batch))
    return Running(relay, thread)


def stop(running: Optional[Running]) -> None:
    """Stop, join and close a relay (None is fine; idempotent)."""
    if running is None or running.relay is None:
        return
    relay = running.relay
    relay.stop()
    running.thread.join(JOIN)
    if running.thread.is_alive():
        log.error("job %s: TM relay did not stop: keeping its descriptors", relay.job_id)
    else:
        relay.close()
        log.info("job %s: TM relay stopped: %d relayed; refused: %d not TM, %d over the bound, %d mom "
                 "unreachable", relay.job_id, relay.relayed, relay.refused["header"], relay.refused["bound"],
                 relay.refused["mom"])
    running.relay = None
