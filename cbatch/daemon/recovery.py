"""cbatchd's reconciliation after its own (re)start: the daemon must never lose or leak a job.

What survives a daemon restart is on disk and in the engine, never only in memory: registrations and the
containers each job's clients own are in ``daemon.state_dir`` (:mod:`cbatch.daemon.registry`), and every container
carries the labels ``cbatch.instance``, ``cbatch.job`` and ``cbatch.peer``. On start-up:

- a container of this instance that no registered job claims is removed;
- a claimed container whose client (same pid, same start time) is still alive waits
  :data:`cbatch.daemon.adoptions.ADOPT_WAIT` seconds for that client to ``attach`` again, then is removed;
- a claimed container whose client is gone is removed;
- mount staging points left by a crash are released (:mod:`cbatch.daemon.pinning`);
- Torque jobs whose session ended while the daemon was down are unregistered as their epilogue would have
  (:func:`cbatch.daemon.cleanup.forget_job`).

Functions take the daemon whose state they reconcile (``engine``, ``registry``, ``adoptions``, ...).
"""

from __future__ import annotations

import logging
import time

from cbatch.core.errors import CbatchError
from cbatch.core.spec import LABEL_INSTANCE
from cbatch.daemon import cleanup, peers, pinning
from cbatch.daemon.adoptions import ADOPT_WAIT

log = logging.getLogger("cbatchd")


def recover(daemon) -> None:
    """Reconcile the engine with the registry (see the module docstring)."""
    try:
        present = set(daemon.engine.list_ids({LABEL_INSTANCE: daemon.instance}))
    except CbatchError as exc:
        log.error("recover: cannot list containers: %s", exc)
        return
    claimed = set()
    for rec in daemon.registry.all():
        job_id = rec.registration.job_id
        for cid, info in list(rec.containers.items()):
            if cid not in present:
                daemon.registry.drop_container(job_id, cid)
                continue
            claimed.add(cid)
            if peers.alive(int(info.get("peer", 0)), info.get("peer_start")):
                log.info("recover: job %s: container %s: waiting %.0f s for pid %s to reattach", job_id,
                         cid[:12], ADOPT_WAIT, info.get("peer"))
                daemon.adoptions.add(cid, job_id, info, ADOPT_WAIT)
            else:
                log.warning("recover: job %s: container %s: its client is gone: removing", job_id, cid[:12])
                cleanup.remove_container(daemon, job_id, cid)
    for cid in present - claimed:
        log.warning("recover: container %s belongs to no registered job: removing", cid[:12])
        cleanup.remove_container(daemon, None, cid)
    unpin_stale(daemon)
    forget_ended_jobs(daemon, at_startup=True)
    if len(daemon.adoptions):
        daemon.adoptions.watch(lambda job_id, cid: _not_reattached(daemon, job_id, cid))


def _not_reattached(daemon, job_id: str, cid: str) -> None:
    log.warning("job %s: container %s: its client did not reattach: removing", job_id, cid[:12])
    cleanup.remove_container(daemon, job_id, cid)


def unpin_stale(daemon) -> None:
    """Pins live only from a launch to its container's start, and no launch runs before we listen: any
    staging point of this instance is a crash's leftover, whatever the state of its container."""
    try:
        pinning.isolate(daemon.config.daemon.mount_dir)
        pinning.unpin_all(daemon.mount_root)
    except (OSError, CbatchError) as exc:
        log.error("recover: mount staging %s: %s", daemon.config.daemon.mount_dir, exc)


def forget_ended_jobs(daemon, at_startup: bool = False) -> None:
    """A Torque job whose session (the starter's pid) is gone ended while we were down, so its epilogue
    could not unregister it: do what that unregister would have done (:func:`cbatch.daemon.cleanup.forget_job`).

    Runs at start-up and after each registration (a job ending in the restart window is still alive at
    start-up). Only jobs registered before this daemon started qualify: a job registered since has its
    epilogue talk to us - between its starter's exit and that epilogue its session is gone too, and
    sweeping it then (back-to-back jobs: the next registration triggers a sweep) raced the epilogue and
    logged a misleading warning. One sweep at a time."""
    if not daemon.sweeping.acquire(blocking=False):
        return
    try:
        for rec in daemon.registry.all():
            reg = rec.registration
            if reg.batch == "slurm" or not reg.session_id or reg.registered_at >= daemon.started_at:
                continue
            if peers.alive(int(reg.session_id), None):
                continue
            log.warning("job %s: its session %s ended %s and no epilogue unregistered it: unregistering",
                        reg.job_id, reg.session_id, "before cbatchd started" if at_startup else "around a restart")
            cleanup.forget_job(daemon, reg.job_id)
            log.info("job %s: unregistered", reg.job_id)
    finally:
        daemon.sweeping.release()
