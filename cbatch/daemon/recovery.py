"""cbatchd's reconciliation after its own (re)start: the daemon must never lose or leak a job.

What survives a daemon restart is on disk and in the engine, never only in memory: registrations and the
containers each job's clients own are in ``daemon.state_dir`` (:mod:`cbatch.daemon.registry`), and every container
carries the labels ``cbatch.instance``, ``cbatch.job`` and ``cbatch.peer``. On start-up:

- a container of this instance that no registered job claims is removed;
- a claimed container whose client (same pid, same start time) is still alive waits
  :data:`cbatch.daemon.adoptions.ADOPT_WAIT` seconds for that client to ``attach`` again, then is removed;
- a claimed container whose client is gone is removed;
- mount staging points left by a crash are released (:mod:`cbatch.daemon.pinning`);
- a start recorded but not yet given a container id is resolved against the engine (adopted, or released);
- jobs that ended while the daemon was down (Torque: session gone; Slurm: job cgroup gone) are unregistered
  as their epilogue would have (:func:`cbatch.daemon.cleanup.forget_job`).

Functions take the daemon whose state they reconcile (``engine``, ``registry``, ``adoptions``, ...).
"""

from __future__ import annotations

import glob
import logging
import threading
import time

from cbatch.core.errors import CbatchError
from cbatch.core.spec import LABEL_INSTANCE, LABEL_JOB
from cbatch.daemon import cleanup, peers, pinning
from cbatch.daemon.adoptions import ADOPT_WAIT

log = logging.getLogger("cbatchd")
PENDING = "pending:"        # registry key of a start recorded before the engine was asked (+ container name)
LABEL_PEER = "cbatch.peer"  # the client's pid, on every container (cbatch.daemon.containerstart)
ENGINE_WAIT = 600.0         # how long start-up recovery keeps retrying an engine that does not answer
ENGINE_RETRY_EVERY = 2.0


def pending_key(name: str) -> str:
    """The registry key :mod:`cbatch.daemon.containerstart` records a start under until the engine gave an id."""
    return PENDING + name


def _started_by(daemon, job_id: str, info: dict) -> list:
    """Containers of this instance for ``job_id`` started for the client ``info`` names (by labels)."""
    return daemon.engine.list_ids({LABEL_INSTANCE: daemon.instance, LABEL_JOB: job_id,
                                   LABEL_PEER: str(info.get("peer"))})


def _resolve_pending(daemon, present: set) -> None:
    """Turn each start recorded before the engine was asked into what the engine has for it.

    A container that ran (running or exited) is recorded under its id and adopted like any other. One the
    engine created but never started ran no user code: it is removed. With nothing left, the job's start is
    released, so its starter (refused when it reattaches) simply starts again."""
    for rec in daemon.registry.all():
        job_id = rec.registration.job_id
        for key, info in list(rec.containers.items()):
            if not key.startswith(PENDING):
                continue
            kept = []
            for cid in _started_by(daemon, job_id, info):
                if cid in rec.containers:
                    kept.append(cid)
                elif daemon.engine.status(cid) == "created":
                    log.warning("recover: job %s: container %s was created but never started: removing",
                                job_id, cid[:12])
                    cleanup.remove_container(daemon, None, cid)
                    present.discard(cid)
                else:
                    daemon.registry.add_container(job_id, cid, info)
                    present.add(cid)
                    kept.append(cid)
            daemon.registry.drop_container(job_id, key)
            if not kept and info.get("kind") == "job":
                log.warning("recover: job %s: its start was cut before the container ran: the starter may "
                            "start it again", job_id)
                daemon.registry.release_start(job_id)


def waiting_for(daemon, peer) -> tuple:
    """``(container id, job id)`` of the adopted container waiting for ``peer`` (a client reattaching
    without an id: it lost us before it learnt the id), or ``(None, None)``."""
    return daemon.adoptions.find(peer.pid, peer.uid)


def _list_present(daemon) -> set:
    """This instance's containers; retried while the engine does not answer (dockerd restarting), up to
    :data:`ENGINE_WAIT`: skipping would leave every adopted job's client without its container."""
    deadline = time.monotonic() + ENGINE_WAIT
    while True:
        try:
            return set(daemon.engine.list_ids({LABEL_INSTANCE: daemon.instance}))
        except CbatchError as exc:
            if time.monotonic() >= deadline:
                raise
            log.error("recover: cannot list containers (%s): retrying in %.0f s", exc, ENGINE_RETRY_EVERY)
            time.sleep(ENGINE_RETRY_EVERY)


def recover(daemon) -> None:
    """Reconcile the engine with the registry (see the module docstring).

    Runs before the daemon listens. An engine that does not answer does not delay listening (cbatch check,
    status and the hooks must work; starts fail with one line): the reconciliation then runs in a thread
    that retries the engine for up to :data:`ENGINE_WAIT`, and ``attach`` requests wait for it
    (``daemon.recovered``) instead of being refused a container that is only not adopted yet."""
    daemon.recovered = threading.Event()
    unpin_stale(daemon)          # needs no engine, and must happen before any launch can pin
    try:
        present = set(daemon.engine.list_ids({LABEL_INSTANCE: daemon.instance}))
    except CbatchError as exc:
        log.error("recover: cannot list containers (%s): retrying in the background for up to %.0f s", exc,
                  ENGINE_WAIT)
        threading.Thread(target=_reconcile_when_engine_back, args=(daemon,), name="recover",
                         daemon=True).start()
        return
    _reconcile(daemon, present)


def _reconcile_when_engine_back(daemon) -> None:
    try:
        present = _list_present(daemon)
    except CbatchError as exc:
        log.error("recover: cannot list containers: %s; gave up after %.0f s", exc, ENGINE_WAIT)
        daemon.recovered.set()
        return
    log.info("recover: the engine answers again: reconciling")
    _reconcile(daemon, present)


def _reconcile(daemon, present: set) -> None:
    try:
        _resolve_pending(daemon, present)
        claimed = set()
        for rec in daemon.registry.all():
            job_id = rec.registration.job_id
            for cid, info in list(rec.containers.items()):
                if cid.startswith(PENDING):
                    continue
                if cid not in present:
                    daemon.registry.drop_container(job_id, cid)
                    continue
                claimed.add(cid)
                if peers.alive(int(info.get("peer", 0)), info.get("peer_start")):
                    log.info("recover: job %s: container %s: waiting %.0f s for pid %s to reattach", job_id,
                             cid[:12], ADOPT_WAIT, info.get("peer"))
                    daemon.adoptions.add(cid, job_id, info, ADOPT_WAIT)
                else:
                    log.warning("recover: job %s: container %s: its client is gone: removing", job_id,
                                cid[:12])
                    cleanup.remove_container(daemon, job_id, cid)
        for cid in present - claimed:
            log.warning("recover: container %s belongs to no registered job: removing", cid[:12])
            cleanup.remove_container(daemon, None, cid)
    except CbatchError as exc:
        log.error("recover: %s", exc)
    finally:
        daemon.recovered.set()
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
    """A job that ended while we were down could not unregister through its epilogue: do what that
    unregister would have done (:func:`cbatch.daemon.cleanup.forget_job`). Torque: its session (the
    starter's pid) is gone; Slurm: its job cgroup is gone (:func:`slurm_job_ended`).

    Runs at start-up and after each registration (a job ending in the restart window is still alive at
    start-up). Only Torque jobs registered before this daemon started qualify: a job registered since has
    its epilogue talk to us - between its starter's exit and that epilogue its session is gone too, and
    sweeping it then (back-to-back jobs: the next registration triggers a sweep) raced the epilogue and
    logged a misleading warning. One sweep at a time."""
    if not daemon.sweeping.acquire(blocking=False):
        return
    try:
        for rec in daemon.registry.all():
            reg = rec.registration
            if reg.batch == "slurm":
                if not slurm_job_ended(reg):
                    continue
                log.warning("job %s: its Slurm job cgroup is gone and no epilog unregistered it: unregistering",
                            reg.job_id)
            else:
                if not reg.session_id or reg.registered_at >= daemon.started_at:
                    continue
                if peers.alive(int(reg.session_id), None):
                    continue
                log.warning("job %s: its session %s ended %s and no epilogue unregistered it: unregistering",
                            reg.job_id, reg.session_id,
                            "before cbatchd started" if at_startup else "around a restart")
            cleanup.forget_job(daemon, reg.job_id)
            log.info("job %s: unregistered", reg.job_id)
    finally:
        daemon.sweeping.release()


SLURM_GRACE = 120.0     # a registration younger than this may precede its job cgroup (prolog before step)
CGROUP_ROOT = "/sys/fs/cgroup"


def slurm_job_ended(reg, root: str = CGROUP_ROOT, now: float = None) -> bool:
    """True when a Slurm job registered long enough ago has no job cgroup left on this node (v1
    ``<ctl>/slurm[_<node>]/uid_<uid>/job_<id>``, v2 ``[...]/slurm[...]/job_<id>``): its epilog ran while
    we were down. Unknown (no Slurm cgroup tree at all, or too young) is False: never forget a live job."""
    now = time.time() if now is None else now
    if not reg.registered_at or now - reg.registered_at < SLURM_GRACE:
        return False
    trees = glob.glob(f"{root}/*/slurm*") + glob.glob(f"{root}/slurm*") + \
        glob.glob(f"{root}/system.slice/slurmstepd.scope")
    if not trees:
        return False
    name = f"job_{reg.job_id}"
    for tree in trees:
        if glob.glob(f"{glob.escape(tree)}/{name}") or glob.glob(f"{glob.escape(tree)}/uid_*/{name}"):
            return False
    return True
