"""Bounds that keep one user from starving the others (issue #9.5, #9.6).

- :class:`ConnectionGate`: open connections per uid (``daemon.max_connections_per_user``) and, for users
  with no registered job on this node, all together (``daemon.max_connections``). Root (the prologue and
  epilogue) and the users whose jobs are registered here are never counted against that shared pool: a
  user outside any job cannot keep another user's hooks, starter or ``cbatch run`` from getting through.
  A connection that becomes a running container's session (:meth:`ConnectionGate.promote`) stops counting:
  sessions are bounded by the jobs themselves and by the per-job ``cbatch run`` cap, and a user with many
  jobs on a big node must not run out of connections.
- :class:`Counter`: at most N at once per key; used for start/run requests still being prepared per uid
  (``daemon.max_pending_per_user``) and for ``cbatch run`` containers per job (``daemon.max_run_containers``,
  0 meaning max(1, the job's cpus on this node)). The ``cbatch run`` containers a restarted daemon adopts
  count from start-up (:class:`cbatch.daemon.adoptions.Adoptions` holds their slots until each one's
  session ends), so a restart never opens room beyond the cap.

Every refusal is one :class:`~cbatch.core.errors.DaemonError` line naming the limit and its config key.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Optional

from cbatch.core.errors import DaemonError, JobError

log = logging.getLogger("cbatchd")
ROOT_CONNECTIONS = 4096    # root is trusted, but every limit has a bound
FD_MARGIN = 1024           # descriptors beyond the connection bounds: jobs' spool files, pidfds, pipes, engine
PENDING_WAIT = 300.0       # a request over the per-uid preparation cap waits this long for a slot, then fails


class ConnectionGate:
    """Admission of a new connection by its peer's uid (see the module docstring). Thread-safe."""

    def __init__(self, total: int, per_user: int) -> None:
        self.total, self.per_user = total, per_user
        self._lock = threading.Lock()
        self._by_uid: Dict[int, int] = {}
        self._shared = 0              # connections counted against ``total``

    def reconfigure(self, total: int, per_user: int) -> None:
        """New limits for connections accepted from now on (a config reload)."""
        with self._lock:
            self.total, self.per_user = total, per_user

    def admit(self, uid: int, has_job: Callable[[int], bool]) -> list:
        """A token for :meth:`release`, or DaemonError (busy). ``has_job(uid)``: is a job of uid registered."""
        with self._lock:
            mine = self._by_uid.get(uid, 0)
            cap = ROOT_CONNECTIONS if uid == 0 else self.per_user
            key = "" if uid == 0 else "daemon.max_connections_per_user"
            if mine >= cap:
                raise DaemonError("daemon", "busy", f"uid {uid} has {mine} connections open",
                                  f"limit {cap}" + (f", key {key}" if key else ""))
            shared = uid != 0 and self._shared >= self.total and not has_job(uid)
            if shared:
                raise DaemonError("daemon", "busy", f"{self._shared} connections of users outside any job",
                                  f"limit {self.total}, key daemon.max_connections")
            counted = uid != 0 and self._shared < self.total
            self._by_uid[uid] = mine + 1
            if counted:
                self._shared += 1
            return [uid, counted, True]

    def release(self, token: list) -> None:
        """Give back what :meth:`admit` took (idempotent per token)."""
        uid, counted, _live = token
        with self._lock:
            if not token[2]:
                return
            token[2] = False
            left = self._by_uid.get(uid, 1) - 1
            if left:
                self._by_uid[uid] = left
            else:
                self._by_uid.pop(uid, None)
            if counted:
                self._shared -= 1

    def promote(self, token: Optional[list]) -> None:
        """The connection now carries a running container's session: it no longer counts."""
        if token is not None:
            self.release(token)

    def count(self, uid: Optional[int] = None) -> int:
        """Open connections of ``uid`` (all when None)."""
        with self._lock:
            return sum(self._by_uid.values()) if uid is None else self._by_uid.get(uid, 0)


class Counter:
    """At most ``limit`` holders per key at once (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._held: Dict[object, int] = {}

    def take(self, key, limit: int, refuse: Callable[[int], Exception], wait: float = 0.0) -> None:
        """Take one slot of ``key``; when ``limit`` are held, wait up to ``wait`` seconds for one, then
        raise ``refuse(held)``."""
        deadline = time.monotonic() + wait
        with self._lock:
            while self._held.get(key, 0) >= limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise refuse(self._held.get(key, 0))
                self._lock.wait(left)
            self._held[key] = self._held.get(key, 0) + 1

    def hold(self, key) -> None:
        """Take one slot of ``key`` whatever the limit: a holder that already exists (a ``cbatch run``
        container adopted after a daemon restart) must count, never be refused."""
        with self._lock:
            self._held[key] = self._held.get(key, 0) + 1

    def give(self, key) -> None:
        """Give back one slot of ``key``."""
        with self._lock:
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            self._lock.notify_all()

    def held(self, key) -> int:
        """Slots of ``key`` held now."""
        with self._lock:
            return self._held.get(key, 0)

    @contextmanager
    def holding(self, key, limit: int, refuse: Callable[[int], Exception], wait: float = 0.0):
        """``take`` for the duration of a ``with`` block."""
        self.take(key, limit, refuse, wait)
        try:
            yield
        finally:
            self.give(key)


def pending_refusal(op: str, uid: int, limit: int) -> Callable[[int], Exception]:
    """The refusal when uid still had ``limit`` requests being prepared after :data:`PENDING_WAIT`."""
    return lambda held: DaemonError(op, "too many requests in progress", f"uid {uid}: {held}",
                                    f"limit {limit}, key daemon.max_pending_per_user; "
                                    f"waited {PENDING_WAIT:.0f} s")


def run_refusal(job_id: str, limit: int) -> Callable[[int], Exception]:
    """``cbatch: run: too many containers for job N: 4 running (limit 4, key daemon.max_run_containers)``."""
    return lambda held: JobError("run", f"too many containers for job {job_id}", f"{held} running",
                                 f"limit {limit}, key daemon.max_run_containers")


def run_limit(configured: int, cpus: Optional[int]) -> int:
    """Concurrent ``cbatch run`` containers one job may have: the key, or max(1, its cpus) when it is 0."""
    return configured if configured > 0 else max(1, cpus or 1)


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one and return it. systemd starts services with a soft limit
    of 1,024, fewer than the connections the gate itself admits (``daemon.max_connections`` users in no job,
    root's :data:`ROOT_CONNECTIONS`, 64 for each user with a job): at that limit a flood of connections made
    every other job's start fail on EMFILE, not on the gate's one-line refusal. Nothing in cbatchd waits with
    select() (cbatch.host.waitfd), so descriptors past 1,023 are safe. Logged when still short of the bounds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:      # RLIM_INFINITY above fs.nr_open: keep the soft limit
            log.warning("descriptor limit: cannot raise the soft limit %d to %s: %s", soft, hard, exc)
    need = max_connections + ROOT_CONNECTIONS + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("descriptor limit %d is below the %d the connection bounds may need (daemon.max_connections "
                    "+ %d for root + %d): raise LimitNOFILE in cbatchd's unit", soft, need, ROOT_CONNECTIONS,
                    FD_MARGIN)
    return soft
