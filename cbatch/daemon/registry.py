"""cbatchd's persisted job registry: one JSON file per registered job in ``<state_dir>/jobs/``.

A record holds the :class:`~cbatch.core.job.Registration` the root prologue sent, whether the job has been
started (one ``start`` per job), and the containers the daemon is supervising for it with the peer that owns
each one (pid and its start time, so a recycled pid never adopts a container). That is everything a
restarted daemon needs to find its jobs again; container labels carry the rest.

Files are written atomically (temporary file, fsync, rename), mode 0600, in a 0700 directory owned by root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from cbatch.core.errors import CbatchError, DaemonError
from cbatch.core.job import Registration

log = logging.getLogger("cbatchd")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(job_id: str) -> str:
    """A file name for ``job_id``: readable, and unique even when sanitising maps two ids together."""
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', job_id)[:64]}-{digest}.json"


@dataclass
class Record:
    """One registered job as the daemon keeps it."""

    registration: Registration
    started: bool = False
    containers: Dict[str, dict] = field(default_factory=dict)   # cid -> {"peer", "peer_start", "kind", ...}

    def to_dict(self) -> dict:
        return {"registration": self.registration.to_dict(), "started": self.started,
                "containers": self.containers}

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        if not isinstance(data, dict):
            raise DaemonError("state", "not an object", type(data).__name__)
        containers = data.get("containers") or {}
        if not isinstance(containers, dict):
            raise DaemonError("state", "bad containers", type(containers).__name__)
        return cls(Registration.from_dict(data.get("registration")), bool(data.get("started")),
                   {str(k): dict(v) for k, v in containers.items() if isinstance(v, dict)})


class Registry:
    """Thread-safe registry of jobs, mirrored to ``<state_dir>/jobs/*.json``."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "jobs")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._lock = threading.RLock()
        self._jobs: Dict[str, Record] = {}
        self._load()

    def _load(self) -> None:
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.startswith(".") or not name.endswith(".json"):
                if name.startswith(".tmp-"):
                    _unlink(path)     # an interrupted atomic write
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    rec = Record.from_dict(json.load(f))
            except (OSError, ValueError, CbatchError) as exc:
                log.error("state: ignoring unreadable job file %s: %s", path, exc)
                continue
            self._jobs[rec.registration.job_id] = rec

    def _path(self, job_id: str) -> str:
        return os.path.join(self.dir, safe_name(job_id))

    def _save(self, rec: Record) -> None:
        path = self._path(rec.registration.job_id)
        tmp = os.path.join(self.dir, f".tmp-{os.getpid()}-{threading.get_ident()}")
        # Compact: with ``indent`` json falls back to its pure-Python encoder (four writes per job).
        data = json.dumps(rec.to_dict(), separators=(",", ":"), sort_keys=True).encode("ascii")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    # -- queries ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Optional[Record]:
        """The record of ``job_id`` or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> List[Record]:
        """Every record (a snapshot list)."""
        with self._lock:
            return list(self._jobs.values())

    def by_session(self, sid: int) -> Optional[Record]:
        """The Torque/local job whose session id is ``sid`` (the newest, should a stale record whose epilogue
        never ran share a recycled pid)."""
        with self._lock:
            found = [rec for rec in self._jobs.values()
                     if rec.registration.batch != "slurm" and rec.registration.session_id == sid]
        return max(found, key=lambda r: r.registration.registered_at) if found else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    # -- changes ------------------------------------------------------------------------------------
    def register(self, reg: Registration) -> bool:
        """Add or replace (a re-run job registers again). Returns True if it replaced a record."""
        with self._lock:
            old = self._jobs.get(reg.job_id)
            rec = Record(reg)
            if old is not None:
                rec.containers = old.containers     # still ours to clean up
            self._save(rec)
            self._jobs[reg.job_id] = rec
            return old is not None

    def unregister(self, job_id: str) -> Optional[Record]:
        """Drop ``job_id`` (its file too); the removed record or None."""
        with self._lock:
            rec = self._jobs.pop(job_id, None)
            _unlink(self._path(job_id))
            return rec

    def claim_start(self, job_id: str, entry: Optional[Tuple[str, dict]] = None, write: bool = True) -> bool:
        """Mark the job started; False if it already was (one start per job, across restarts too).
        ``entry`` (key, info): a container entry recorded with it (the start's claim). ``write=False``: in
        memory only, written with the record's next change (a start's pending entry, or the claim's drop):
        a daemon that dies before that finds the job unstarted - what recovery makes of a claim anyway."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None or rec.started:
                return False
            rec.started = True
            if entry is not None:
                rec.containers[entry[0]] = dict(entry[1])
            if write:
                self._save(rec)
            return True

    def release_start(self, job_id: str) -> None:
        """Undo :meth:`claim_start` when the start was cut before any container ran (start-up recovery of a
        start recorded as pending: the starter may then ask again)."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None and rec.started:
                rec.started = False
                self._save(rec)

    def add_container(self, job_id: str, cid: str, info: dict) -> None:
        """Remember a container we supervise (so a restarted daemon can adopt it)."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None:
                rec.containers[cid] = dict(info)
                self._save(rec)

    def replace_container(self, job_id: str, old: str, cid: str, info: dict) -> None:
        """Record ``cid`` and forget ``old`` in ONE write (a start's claim -> its pending container -> the
        container): the file never lacks both, and a start costs one fsync per step, not two."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None:
                rec.containers.pop(old, None)
                rec.containers[cid] = dict(info)
                self._save(rec)

    def drop_container(self, job_id: str, cid: str, write: bool = True) -> None:
        """Forget a container (it is removed). ``write=False``: in memory only, written with the record's next
        change - for a container the engine no longer has, which start-up recovery drops from a record anyway
        (a job's last container goes right before its unregister deletes the file: one fsync less per job)."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None and rec.containers.pop(cid, None) is not None and write:
                self._save(rec)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
