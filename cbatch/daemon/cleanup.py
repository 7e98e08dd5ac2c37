"""Removing what a job leaves on this node: its containers, staging mounts, adoptions, cgroups, registration.

One place owns "forget a job" (:func:`forget_job`): the epilogue's ``unregister`` request, recovery's sweep
of jobs that ended while the daemon was down, and nothing else. Idempotent, and it checks its own work:
what is still there afterwards is returned as one error line each.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from cbatch.core.errors import CbatchError, DaemonError
from cbatch.core.policy import container_name
from cbatch.core.spec import LABEL_INSTANCE, LABEL_JOB
from cbatch.daemon import pinning
from cbatch.host import cgroups

log = logging.getLogger("cbatchd")
UNREGISTER_SETTLE = 5.0     # seconds to wait for containers a session thread is already removing
STARTS_SETTLE = 60.0        # seconds a job's cleanup waits for its container starts in flight (engine timeouts)


class StartsInFlight:
    """Container starts in progress, per job. A job's cleanup waits for them and then removes what they made:
    racing a start, it found a container between create and start (not running, so its layer was released,
    or runc's half-made bundle removed), and the start then ran the job in it anyway (both engines)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count: dict = {}

    @contextlib.contextmanager
    def start(self, job_id: str):
        """Held by a start from its record to its reply."""
        with self._cond:
            self._count[job_id] = self._count.get(job_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._count[job_id] -= 1
                if not self._count[job_id]:
                    del self._count[job_id]
                self._cond.notify_all()

    def wait_idle(self, job_id: str, timeout: float) -> bool:
        """Until no start of ``job_id`` is in flight (False when ``timeout`` ran out first)."""
        with self._cond:
            return self._cond.wait_for(lambda: job_id not in self._count, timeout)


def remove_container(daemon, job_id, cid: str) -> bool:
    """Remove one container and forget it (errors are logged: the sweeps try again later). True if gone."""
    try:
        daemon.engine.remove(cid)
    except CbatchError as exc:
        log.error("could not remove container %s: %s", cid[:12], exc)
        return False
    if job_id is not None:
        # Not written now: the engine no longer has it, and recovery drops a recorded id it cannot find.
        daemon.registry.drop_container(job_id, cid, write=False)
    return True


def forget_job(daemon, job_id: str) -> dict:
    """Everything ``unregister`` does: remove the job's containers, unpin its staging mounts, drop its
    pending adoptions, tidy its Torque cgroups, and drop its registration. Returns the reply fields."""
    rec = daemon.registry.get(job_id)
    errors = []
    labels = {LABEL_JOB: job_id, LABEL_INSTANCE: daemon.instance}
    if not daemon.starts.wait_idle(job_id, STARTS_SETTLE):
        log.warning("job %s: a container start still in flight after %.0f s: cleaning up anyway", job_id,
                    STARTS_SETTLE)
    try:
        leftovers = daemon.engine.cleanup(labels)
        # pbs_mom runs the epilogue the moment the starter dies, while the session thread may still be
        # removing the container ("removal already in progress"): give that a moment before reporting.
        deadline = time.monotonic() + UNREGISTER_SETTLE
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.2)
            leftovers = daemon.engine.cleanup(labels)
    except CbatchError as exc:
        leftovers, errors = [], [exc.message]
    for cid in leftovers:
        errors.append(DaemonError(f"job {job_id}", "container left behind", cid[:12]).message)
    for path in pinning.unpin_all(daemon.mount_root, container_name(job_id)):
        errors.append(DaemonError(f"job {job_id}", "staging mount left behind", path).message)
    daemon.adoptions.forget_job(job_id)
    cgroup_left = []
    if rec is None or rec.registration.batch != "slurm":
        try:
            parent = cgroups.torque_parent(job_id)
            if parent:
                cgroup_left = list(cgroups.tidy(parent))
        except (OSError, CbatchError) as exc:
            errors.append(DaemonError(f"job {job_id}", "cgroup tidy failed", str(exc)).message)
    for path in cgroup_left:
        errors.append(DaemonError(f"job {job_id}", "cgroup left behind", path).message)
    daemon.registry.unregister(job_id)
    for line in errors:
        log.error("%s", line)
    return {"job_id": job_id, "known": rec is not None, "leftovers": leftovers,
            "cgroup_leftovers": cgroup_left, "errors": errors}
