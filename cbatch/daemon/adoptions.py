"""Containers waiting, after a daemon restart, for their client to ``attach`` again.

One :class:`Adoptions` object per daemon owns the table, its lock and its expiry: recovery adds the
containers whose client is still alive, ``attach`` takes one (only its own client, within the window),
unregister forgets a job's, and :meth:`Adoptions.expire` hands back the ones whose client did not return.

A ``cbatch run`` container counts against its job's cap (``daemon.max_run_containers``) from the moment it is
adopted: :meth:`Adoptions.add` holds a slot of ``runs`` (the daemon's per-job counter) for it, which
:meth:`Adoptions.forget_job` and :meth:`Adoptions.expire` give back, and which :meth:`Adoptions.take` hands to
the reattaching session (it gives it back when it ends: :meth:`Adoptions.release_run`). Without it a restarted daemon
counted only the runs started since, and a job could double its containers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from cbatch.daemon import peers

ADOPT_WAIT = 10.0      # seconds a surviving client has to reattach after a daemon restart


@dataclass(frozen=True)
class Pending:
    """One container waiting for its client."""

    job_id: str
    info: dict            # the registry's record of the container (peer, peer_start, uid, kind, ...)
    deadline: float       # time.monotonic()


class Adoptions:
    """The table of :class:`Pending` adoptions by container id (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, runs=None) -> None:
        self._lock = threading.Lock()
        self._table: Dict[str, Pending] = {}
        self._clock = clock
        self._runs = runs     # cbatch.daemon.limits.Counter of cbatch run containers per job, or None

    def add(self, cid: str, job_id: str, info: dict, wait: float = ADOPT_WAIT) -> None:
        """Let ``info``'s client reattach to ``cid`` for ``wait`` seconds. A ``cbatch run`` container takes
        its job's run slot now (see the module docstring)."""
        with self._lock:
            if cid in self._table:
                return
            self._table[cid] = Pending(job_id, dict(info), self._clock() + wait)
            if _is_run(info) and self._runs is not None:
                self._runs.hold(job_id)

    def _release(self, entry: Pending) -> None:
        if _is_run(entry.info) and self._runs is not None:
            self._runs.give(entry.job_id)

    def take(self, cid: str, job_id: str, pid: int, uid: int) -> Optional[dict]:
        """The record of ``cid`` if it waits for exactly this client (pid, its start time, uid) and job; it is
        no longer pending then. None otherwise (the entry stays for its real client)."""
        with self._lock:
            entry = self._table.get(cid)
            if entry is None or entry.job_id != job_id or entry.deadline < self._clock():
                return None
            info = entry.info
            if info.get("peer") != pid or info.get("uid") != uid or not peers.alive(pid, info.get("peer_start")):
                return None
            del self._table[cid]
            return info     # a run's slot goes with it: the session gives it back (release_run)

    def release_run(self, job_id: str, info: dict) -> None:
        """The session of a container :meth:`take` handed out ended: give back its run slot (if a run)."""
        self._release(Pending(job_id, info, 0.0))

    def find(self, pid: int, uid: int) -> Tuple[Optional[str], Optional[str]]:
        """``(container id, job id)`` of the adoption waiting for client ``pid`` of ``uid`` (a client that lost
        the daemon before it learnt its container's id), or ``(None, None)``. :meth:`take` still checks the
        client's start time."""
        with self._lock:
            for cid, e in self._table.items():
                if e.info.get("peer") == pid and e.info.get("uid") == uid:
                    return cid, e.job_id
        return None, None

    def forget_job(self, job_id: str) -> List[str]:
        """Drop every pending adoption of ``job_id`` (its epilogue ran); their container ids."""
        with self._lock:
            gone = [cid for cid, e in self._table.items() if e.job_id == job_id]
            for cid in gone:
                self._release(self._table.pop(cid))
            return gone

    def expire(self) -> List[Tuple[str, str]]:
        """Remove and return ``(cid, job_id)`` of the adoptions whose window has passed."""
        now = self._clock()
        with self._lock:
            late = [(cid, e.job_id) for cid, e in self._table.items() if e.deadline < now]
            for cid, _job in late:
                self._release(self._table.pop(cid))
            return late

    def cids(self) -> List[str]:
        """Container ids still waiting (sorted)."""
        with self._lock:
            return sorted(self._table)

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    def watch(self, remove: Callable[[str, str], None], interval: float = 0.5) -> threading.Thread:
        """Start a thread calling ``remove(job_id, cid)`` for each expired adoption; it ends when none wait."""
        def loop() -> None:
            while True:
                time.sleep(interval)
                for cid, job_id in self.expire():
                    remove(job_id, cid)
                if not len(self):
                    return
        t = threading.Thread(target=loop, name="adoptions", daemon=True)
        t.start()
        return t


def _is_run(info: dict) -> bool:
    return info.get("kind") == "run"
