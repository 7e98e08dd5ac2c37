"""Enforce a job's ``cput=`` on its container when TORQUE has no cgroup for the job.

pbs_mom without cgroups sums the CPU time of its session's processes; a container's processes are not in
the session (they are children of the engine), so pbs_mom never sees them: ``resources_used.cput`` stays
0 and ``cput=`` is never enforced. With TORQUE's cgroup build the container nests under ``/torque/<jobid>``
and pbs_mom accounts and enforces it itself, so there is nothing to do here.

Otherwise each container session gets one watcher thread that reads the container's CPU time from its
cgroup (one small kernel file, every :data:`POLL` seconds) and, once it exceeds the limit, stops the
container as pbs_mom stops a job (SIGTERM, SIGKILL after ``daemon.stop_grace``) and leaves one line for the
job's .e file. The session stops and joins its watcher before it ends (:func:`stop`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from cbatch.core.errors import CbatchError, JobError
from cbatch.host import cgroups

log = logging.getLogger("cbatchd")
POLL = 1.0          # seconds between reads: the overshoot is at most POLL x the CPUs the container may use
JOIN_EXTRA = 30.0   # beyond the stop grace, how long a session waits for its watcher's engine.stop to return


def hms(seconds: float) -> str:
    """``HH:MM:SS`` as Torque writes cput (whole seconds, hours may exceed 99)."""
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def hms_ns(ns: int) -> str:
    """``HH:MM:SS.d`` of a CPU time in nanoseconds, rounded UP to the tenth: a time just over the limit
    never reads as equal to it."""
    s, frac = divmod(-(-int(ns) // 100_000_000), 10)
    return f"{hms(s)}.{frac}"


def exceeded(used_ns: Optional[int], limit_s: int) -> bool:
    """True once the container's CPU time is strictly above the limit (pbs_mom: ``cput > limit``)."""
    return used_ns is not None and used_ns > limit_s * 1_000_000_000


def message(job_id: str, used_ns: int, limit_s: int) -> str:
    """The one line the job's .e file gets."""
    return JobError(f"job {job_id}", "cput limit exceeded", f"{hms_ns(used_ns)} > {hms(limit_s)}",
                    "CPU time of all the container's processes; request more with qsub -l cput=HH:MM:SS").message


class Watch:
    """One container's CPU-time watcher. ``usage()`` returns nanoseconds or None (not readable now);
    ``kill()`` stops the container. Both run in the watcher's thread."""

    def __init__(self, job_id: str, limit_s: int, usage: Callable[[], Optional[int]], kill: Callable[[], None],
                 poll: float = POLL) -> None:
        self.job_id, self.limit_s, self.usage, self.kill, self.poll = job_id, limit_s, usage, kill, poll
        self.line: Optional[str] = None          # set (before the kill) once the limit was exceeded
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def check(self) -> bool:
        """One poll: True (and the line set, the container stopped) if the limit is exceeded."""
        used = self.usage()
        if not exceeded(used, self.limit_s):
            return False
        self.line = message(self.job_id, used, self.limit_s)
        log.warning("job %s: %s: stopping the container", self.job_id, self.line)
        self.kill()
        return True

    def run(self) -> None:
        """Poll until stopped or the limit is exceeded (then the watcher has done its one job)."""
        while not self._stop.wait(self.poll):
            try:
                if self.check():
                    return
            except Exception as exc:  # noqa: BLE001 - a failing read or stop must not kill the daemon
                log.error("job %s: cput watcher: %s: %s", self.job_id, type(exc).__name__, exc)

    def start(self, name: str) -> "Watch":
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float) -> bool:
        """Stop and join (idempotent). True if the thread is (impossibly) still running."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout)
            return self.thread.is_alive()
        return False


def start(daemon, sess) -> Optional[Watch]:
    """A started watcher for ``sess`` when it has a cput limit and no TORQUE job cgroup, else None."""
    if not sess.cput_limit or sess.cgroup_parent:
        return None
    engine, grace = daemon.engine, daemon.config.daemon.stop_grace
    found: dict = {}

    def usage() -> Optional[int]:
        if "path" not in found:
            try:
                pid = engine.container_pid(sess.cid)
            except CbatchError:
                return None                      # the engine is away (restart) or the container is gone
            if not pid:
                return None                      # not running (exited): the session is ending
            path = cgroups.cpu_usage_file(pid, sess.cid)
            if path is None:
                log.error("job %s: container %s: no CPU accounting file found: cput=%s not enforced",
                          sess.job_id, sess.cid[:12], hms(sess.cput_limit))
            found["path"] = path
        return cgroups.read_cpu_ns(found["path"]) if found["path"] else None

    def kill() -> None:
        engine.stop(sess.cid, grace)

    log.info("job %s: container %s: cbatchd enforces cput=%s (no TORQUE job cgroup)", sess.job_id,
             sess.cid[:12], hms(sess.cput_limit))
    return Watch(sess.job_id, sess.cput_limit, usage, kill).start(f"cput-{sess.cid[:12]}")


def stop(daemon, watch: Optional[Watch]) -> Optional[str]:
    """Stop and join ``watch`` (None is fine; idempotent); its line if it stopped the container."""
    if watch is None:
        return None
    if watch.stop(daemon.config.daemon.stop_grace + JOIN_EXTRA):
        log.error("job %s: cput watcher did not stop", watch.job_id)
    return watch.line
