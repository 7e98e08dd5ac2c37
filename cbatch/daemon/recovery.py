"""cbatchd's reconciliation after its own (re)start: the daemon must never lose or leak a job.

What survives a daemon restart is on disk and in the engine, never only in memory: registrations and the
containers each job's clients own are in ``daemon.state_dir`` (:mod:`cbatch.daemon.registry`), and every container
carries the labels ``cbatch.instance``, ``cbatch.job`` and ``cbatch.peer``. On start-up:

- a container of this instance that no registered job claims is removed;
- a claimed container whose client (same pid, same start time) is still alive waits
  :data:`cbatch.daemon.server.ADOPT_WAIT` seconds for that client to ``attach`` again, then is removed;
- a claimed container whose client is gone is removed;
- mount staging points left by a crash are released (:mod:`cbatch.daemon.pinning`);
- Torque jobs whose session ended while the daemon was down are unregistered as their epilogue would have.

Functions take the :class:`cbatch.daemon.server.Daemon` whose state they reconcile.
"""

from __future__ import annotations

import logging
import threading
import time

from cbatch.daemon import peers
from cbatch.core.errors import CbatchError
from cbatch.core.spec import LABEL_INSTANCE

log = logging.getLogger("cbatchd")


def recover(daemon) -> None:
    """Reconcile the engine with the registry (see the module docstring)."""
    from cbatch.daemon.server import ADOPT_WAIT
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
                daemon.adoptions[cid] = (job_id, info, time.monotonic() + ADOPT_WAIT)
            else:
                log.warning("recover: job %s: container %s: its client is gone: removing", job_id, cid[:12])
                daemon.remove_container(job_id, cid)
    for cid in present - claimed:
        log.warning("recover: container %s belongs to no registered job: removing", cid[:12])
        daemon.remove_container(None, cid)
    unpin_stale(daemon)
    forget_ended_jobs(daemon)
    if daemon.adoptions:
        threading.Thread(target=expire_adoptions, args=(daemon,), daemon=True).start()


def unpin_stale(daemon) -> None:
    """Pins live only from a launch to its container's start, and no launch runs before we listen: any
    staging point of this instance is a crash's leftover, whatever the state of its container."""
    from cbatch.daemon import pinning
    try:
        pinning.isolate(daemon.config.daemon.mount_dir)
        pinning.unpin_all(daemon.mount_root)
    except (OSError, CbatchError) as exc:
        log.error("recover: mount staging %s: %s", daemon.config.daemon.mount_dir, exc)


def forget_ended_jobs(daemon) -> None:
    """A Torque job whose session (the starter's pid) is gone ended while we were down, so its epilogue
    could not unregister it: do what that unregister would have done (containers, cgroup tidy, registry).
    Runs at start-up and after each registration (a job ending in the restart window is still alive at
    start-up). One sweep at a time."""
    if not daemon.sweeping.acquire(blocking=False):
        return
    try:
        for rec in daemon.registry.all():
            reg = rec.registration
            if reg.batch == "slurm" or not reg.session_id or peers.alive(int(reg.session_id), None):
                continue
            log.warning("job %s: its session %s is gone but its epilogue never unregistered it: "
                        "unregistering", reg.job_id, reg.session_id)
            daemon.op_unregister(None, None, {"job_id": reg.job_id}, [])
    finally:
        daemon.sweeping.release()


def expire_adoptions(daemon) -> None:
    """Remove adopted containers whose client did not reattach in time; ends when none are pending."""
    while True:
        time.sleep(0.5)
        now = time.monotonic()
        with daemon.lock:
            late = [(cid, job) for cid, (job, _i, deadline) in daemon.adoptions.items() if deadline < now]
            for cid, _job in late:
                del daemon.adoptions[cid]
            if not daemon.adoptions and not late:
                return
        for cid, job_id in late:
            log.warning("job %s: container %s: its client did not reattach: removing", job_id, cid[:12])
            daemon.remove_container(job_id, cid)
