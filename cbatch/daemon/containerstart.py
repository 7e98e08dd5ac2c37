"""The decided container's start, for :mod:`cbatch.daemon.launch`: the image present (or pulled) and its
facts in the job's environment, a TORQUE/PBS job's TM plan, every mount pinned, the start recorded before the
engine creates anything, the engine's start, the "started" answer, the pins released.

:mod:`cbatch.daemon.launch` authorises a request and decides what runs; this module makes it run.
"""

from __future__ import annotations

import dataclasses
import logging

from cbatch import protocol
from cbatch.core.errors import CbatchError
from cbatch.daemon import pinning, recovery, tmclient
from cbatch.daemon.streams import say_nowait
from cbatch.daemon.supervise import Session

log = logging.getLogger("cbatchd")
CLAIM = recovery.pending_key("start")    # registry key: a start claimed, not yet answered or recorded
LABEL_PEER = "cbatch.peer"          # the client's pid (for admins; the registry keeps the authoritative copy)


def _progress(fd: int):
    """Image pull progress goes to the client's stderr (the job's .e file), one line at a time, never
    blocking the request on a stderr pipe nobody reads."""
    return lambda line: say_nowait(fd, line)


def launch(daemon, conn, peer, job, spec, stdio, pump, fds, kind: str, tty_fd=None, opened=None) -> Session:
    """Start the decided container ``spec`` for ``peer`` and answer "started" on ``conn``; return its Session.

    ``fds`` are the client's stdin, stdout and stderr; ``stdio``/``pump`` the choice of
    :func:`cbatch.daemon.streams.choose_stdio`; ``kind`` is "job" or "run"; ``opened`` the job's paths the
    resolver already opened as the user (for pinning). The job's start claim (:data:`CLAIM`) is replaced by
    the pending record of this container.
    """
    env = tuple(spec.env)
    # Present, or pulled now when the queue says pull: missing; else one "not on this node" line.
    info = daemon.images.ensure(spec.image, daemon.config.queue(job.queue), _progress(fds[2]))
    env += tuple(daemon.images.job_env(spec.image, info))
    spec = dataclasses.replace(spec, env=env, labels=tuple(spec.labels) + ((LABEL_PEER, str(peer.pid)),),
                               image_id=getattr(info, "id", None) or None)
    spec, tm = _with_tm(daemon, job, spec, peer, kind)
    # Docker mounts root-owned staging points holding the exact objects checked as the user (no path it
    # re-resolves is one the user can swap); site mounts come from the root-owned config and are not pinned.
    # The stdout/stderr spool files are staged from the client's own fds.
    spool = [(attr, fd) for attr, fd in (("stdout_path", fds[1]), ("stderr_path", fds[2])) if getattr(stdio, attr)]
    pinned, pins = pinning.pin(spec, job.identity, daemon.mount_root,
                               daemon.config.queue(job.queue).mounts + (tm.mounts if tm else ()),
                               [fd for _attr, fd in spool], opened)
    staged = dataclasses.replace(stdio, fds=tuple(fds[:3]),
                                 **{attr: point for (attr, _fd), point in zip(spool, pins.held)})
    limit = spec.memory_bytes or job.resources.memory_on(daemon.config.daemon.hostname or None)
    sess = Session(cid="", job_id=job.job_id, batch=job.batch, kind=kind, peer_pid=peer.pid, uid=peer.uid,
                   memory_limit=limit, pump_fds=pump, owned_fds=tuple(fds), name=spec.name, tty_fd=tty_fd,
                   user=job.identity.user, queue=job.queue, image=spec.image,
                   image_id=getattr(info, "id", "") or "", cgroup_parent=job.cgroup_parent,
                   cput_limit=job.resources.cput, tm_port=tm.port if tm else None)
    # Recorded BEFORE the engine creates anything: a daemon that dies from here on leaves a record naming
    # the client and the container's labels, so its successor finds the container (however far the start
    # got) and the client can take it back (attach without an id) - no start-to-record window.
    # A job's cleanup (its epilogue: cleanup.forget_job) waits until this start is recorded and answered,
    # then removes what it made; it never races a half-made container.
    with daemon.starts.start(job.job_id):
        pending = recovery.pending_key(spec.name)
        daemon.registry.replace_container(job.job_id, CLAIM, pending, sess.record())    # it stands for the claim
        try:
            cid = daemon.engine.start(pinned, staged, daemon.instance, daemon.config.daemon.helper)
        except BaseException:
            pinning.release(daemon.mount_root, spec.name)
            daemon.registry.drop_container(job.job_id, pending)
            raise
        sess.cid = cid
        if not daemon.engine.proxied(cid):
            sess.pump_fds = (None, None, None)      # the container has the client's descriptors itself
        try:
            daemon.registry.replace_container(job.job_id, pending, cid, sess.record())
            protocol.send(conn, {"ok": True, "event": "started", "id": cid, "job_id": job.job_id,
                                 "name": spec.name, "image": spec.image})
        except BaseException:
            try:
                daemon.engine.remove(cid)
            except CbatchError as exc:
                log.error("job %s: could not remove container %s: %s", job.job_id, cid[:12], exc)
            daemon.registry.drop_container(job.job_id, cid)
            daemon.registry.drop_container(job.job_id, pending)
            raise
        finally:
            # Only once the container is recorded: its own mount namespace holds its mounts now.
            pinning.release(daemon.mount_root, spec.name)
    log.info("job %s: %s container %s (%s, image %s) for pid %d; stdout %s, stderr %s", job.job_id, kind,
             cid[:12], spec.name, spec.image, peer.pid, stdio.stdout_path or "proxied",
             stdio.stderr_path or "proxied")
    daemon.gate.promote(getattr(peer, "token", None))     # a session: bounded by jobs, not connection caps
    return sess


def _with_tm(daemon, job, spec, peer, kind: str):
    """``(spec, TmPlan or None)``: a TORQUE container job gets the TORQUE client mounts and a TM port for its
    relay (:mod:`cbatch.daemon.tmclient`). A client directory the job already mounts is left to that mount."""
    if kind != "job":
        return spec, None
    tm = tmclient.plan(daemon.config, daemon.config.queue(job.queue), job.batch, peer.pid, spec.env_dict())
    if tm is None:
        return spec, None
    taken = {m.target for m in spec.mounts}
    tm = dataclasses.replace(tm, mounts=tuple(m for m in tm.mounts if m.target not in taken))
    return dataclasses.replace(spec, mounts=tuple(spec.mounts) + tm.mounts), tm

