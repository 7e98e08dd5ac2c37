"""cbatchd's ``start``, ``run`` and ``attach`` requests: authorise, decide, start a container, supervise.

The request carries only what the client saw (argv, the stdin line, cwd, environment, its fds). Who the
client is comes from SO_PEERCRED and /proc (:mod:`cbatch.daemon.peers`); which job it belongs to from the registry
the root prologue filled; what runs from the daemon's own config, the script the daemon reads itself, and
:mod:`cbatch.core.policy`. The decided container is started by :func:`cbatch.daemon.containerstart.launch`
and supervised by :mod:`cbatch.daemon.supervise`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import stat
import time

from cbatch import protocol
from cbatch.daemon import audit, cleanup, limits, peers, recovery, tasks
from cbatch.daemon.containerstart import CLAIM, launch
from cbatch.core import policy
from cbatch.core.directives import parse_options, parse_script
from cbatch.core.errors import AccessDenied, CbatchError, DaemonError, JobError
from cbatch.core.job import Identity, JobContext
from cbatch.core.resources import parse_resource_list
from cbatch.core.spec import Native
from cbatch.host import cgroups
from cbatch.host.paths import batch_resolver
from cbatch.daemon.streams import choose_stdio
from cbatch.daemon.supervise import Session, supervise
from cbatch.engines.base import Stdio

log = logging.getLogger("cbatchd")
MAX_SCRIPT = 1 << 20
ATTACH_WAIT = 60.0     # an attach waits this long for start-up recovery (an engine that is slow to return)
# Run containers are named ...-run-<n>; seeding from the clock keeps names unique across daemon restarts.
_RUN_INDEX = itertools.count(int(time.time() * 10) % 10**9)


def read_script(path: str, uid: int) -> bytes:
    """The first MiB of the job script, read by root without following a symlink.

    It must be a regular file owned by the job's user (or root): a user cannot point the daemon at a file
    they do not own to have its ``#CBATCH`` lines read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise JobError("job script", "cannot open", f"{path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobError("job script", "not a regular file", path)
        if st.st_uid not in (uid, 0):
            raise AccessDenied("job script", "not owned by the job's user", path)
        chunks, left = [], MAX_SCRIPT
        while left > 0:
            data = os.read(fd, min(left, 65536))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        return b"".join(chunks)
    except OSError as exc:
        raise JobError("job script", "cannot read", f"{path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _resolver(job: JobContext):
    """The policy's resolver with the job's own paths resolved up front in one child (one fork per start,
    not one per path: the forks were most of the decision's time). The same child opens them for pinning
    (``.opened``, closed by the start when done)."""
    return batch_resolver((job.script_path, job.node_file, job.tmpdir, job.identity.home, job.cwd), job.identity,
                          pin=True)


def _cgroup_parent(reg, peer_pid: int):
    """The job's cgroup for ``--cgroup-parent`` (Torque: /torque/<id>; PBS: pbs_cgroups' one; Slurm: the caller's)."""
    if reg.batch == "slurm":
        found = peers.slurm_job_of(peer_pid)
        return found[2] if found and found[1] == reg.job_id else None
    if reg.batch == "pbs":
        return cgroups.pbs_parent(reg.job_id)
    return cgroups.torque_parent(reg.job_id)


def _request(msg: dict, fds) -> tuple:
    argv = protocol.get_str_list(msg, "argv")
    cwd = protocol.get_str(msg, "cwd")
    env = protocol.get_pairs(msg, "env")
    if len(fds) != 3:
        raise protocol.bad_field("fds", "exactly stdin, stdout and stderr as SCM_RIGHTS")
    return argv, cwd, env


def start(daemon, conn, peer, msg: dict, fds) -> dict | None:
    """A job starter asks to start its job (one start per job), or pbs_mom starts an interactive job or a
    TM task through the starter (:mod:`cbatch.daemon.tasks`)."""
    kind = protocol.get_str(msg, "kind", "batch")
    if kind == "task":
        return tasks.task(daemon, conn, peer, msg, fds)
    if kind not in ("batch", "interactive", "exec"):
        raise protocol.bad_field("kind", "batch | interactive | task | exec")
    interactive = kind == "interactive"
    if kind == "exec":
        # PBS `qsub -- prog`: the starter is the registered session leader as for a batch job.
        rec = peers.start_job(daemon.registry, peer.pid, peer.uid)
        if rec.registration.batch != "pbs":
            raise AccessDenied("start", "exec starts are PBS's", rec.registration.job_id)
        interactive = "exec"
    elif interactive:
        rec = tasks.interactive_job(daemon.registry, peer.pid, peer.uid)
    else:
        rec = peers.start_job(daemon.registry, peer.pid, peer.uid)
    try:
        with _pending(daemon, peer, "start"):
            sess = _prepare_start(daemon, conn, peer, rec, msg, fds, interactive)
    except CbatchError as exc:
        audit.refused(rec.registration, peer.uid, "job", exc.message)
        raise
    if sess is None:
        # Native: answered already; the connection and the fds were handed to us (a None reply keeps them).
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    supervise(daemon, conn, sess)
    return None


def _prepare_start(daemon, conn, peer, rec, msg, fds, interactive: bool):
    """Claim the job's one start, decide, and either answer "native" (None) or start its container."""
    reg = rec.registration
    argv, cwd, env = _request(msg, fds)
    line = protocol.get_str(msg, "line")
    if interactive == "exec":
        if len(argv) < 3 or argv[1] != "--pbs-exec" or not argv[2].startswith("/"):
            raise protocol.bad_field("argv", "[starter, --pbs-exec, /absolute/program, args...]")
    elif not interactive and len(argv) != 2:
        raise protocol.bad_field("argv", "[starter, shell]")
    if interactive and len(argv) < 2:
        raise protocol.bad_field("argv", "[starter, shell, args...]")
    # The claim is written with the pending start that replaces it (containerstart.launch), or with its drop
    # (native, or refused): a daemon that dies before finds the job unstarted, so the starter may ask again -
    # what recovery._resolve_pending would make of a written claim. One fsync less per start.
    claim = {"peer": peer.pid, "peer_start": peers.start_time(peer.pid), "kind": "job", "uid": peer.uid,
             "batch": reg.batch}
    if not daemon.registry.claim_start(reg.job_id, (CLAIM, claim), write=False):
        raise AccessDenied("start", "job already started", reg.job_id, "a job starts once")
    resolve = None
    try:
        decision, job, resolve = _decide_start(daemon, peer, reg, argv, cwd, env, line, interactive)
        if isinstance(decision, Native):
            log.info("job %s: %snative (%s)", reg.job_id, "exec, " if interactive == "exec" else "interactive, " if interactive else "", decision.reason)
            audit.native(reg, peer.uid, "job", decision.reason)
            # Answered before the claim entry goes, so no restart can fall between the two.
            protocol.send(conn, {"ok": True, "mode": "native", "reason": decision.reason})
            return None
        if interactive == "exec":
            # PBS `qsub -- prog args`: the program itself in the queue's container, stdin /dev/null as PBS gives.
            spec = dataclasses.replace(decision, argv=tuple(argv[2:]), stdin_line=None)
            stdio, pump = choose_stdio(fds, attach_stdin=False, uid=peer.uid)
            return launch(daemon, conn, peer, job, spec, stdio, pump, fds, "job", opened=resolve.opened)
        if interactive:
            # The queue's container with the job's terminal: the policy's shell (argv[0] of its decision) run
            # interactively, plus qsub -I -x's "-c cmd"; no stdin line. The daemon proxies the pty raw.
            if not os.isatty(fds[0]):
                raise JobError("interactive job", "stdin is not a terminal", reg.job_id,
                               "pbs_mom gives an interactive job its pty")
            spec = dataclasses.replace(decision, argv=(decision.argv[0], *argv[2:]), stdin_line=None)
            return launch(daemon, conn, peer, job, spec, Stdio(attach=True, tty=True), (None, None, None), fds,
                          "job", tty_fd=fds[0], opened=resolve.opened)
        stdio, pump = choose_stdio(fds, attach_stdin=False, uid=peer.uid)
        return launch(daemon, conn, peer, job, decision, stdio, pump, fds, "job", opened=resolve.opened)
    finally:
        daemon.registry.drop_container(reg.job_id, CLAIM)
        if resolve is not None:
            resolve.close()


def _decide_start(daemon, peer, reg, argv, cwd, env, line, interactive):
    identity = Identity.lookup(reg.user)
    script_gone = False
    if interactive:
        # No job script: pbs_mom names a .SC path in the prologue's argv that an interactive job need not
        # have. The queue's policy alone decides.
        try:
            directives = parse_script(read_script(reg.script_path, identity.uid))
        except JobError:
            directives = parse_script(b"")
            script_gone = True
    else:
        words = line.split()
        if not words or words[0] != reg.script_path:
            log.warning("job %s: stdin line does not name the registered script %s", reg.job_id,
                        reg.script_path)
        directives = parse_script(read_script(reg.script_path, identity.uid))
    shell = argv[2] if interactive == "exec" else argv[1]
    job = JobContext.for_start(reg, identity, shell, line, cwd, env, _cgroup_parent(reg, peer.pid),
                               peers.umask_of(peer.pid))
    if script_gone:         # nothing to mount: the policy mounts the job script only when there is one
        job = dataclasses.replace(job, script_path="")
    resolve = _resolver(job)
    try:
        return policy.decide(daemon.config, job, directives, resolve, _tags_of(daemon)), job, resolve
    except BaseException:
        resolve.close()
        raise


def run(daemon, conn, peer, msg: dict, fds) -> dict | None:
    """``cbatch run`` from inside a registered job (several at once, up to the job's limit: MPI ranks)."""
    rec = peers.run_job(daemon.registry, peer.pid, peer.uid)
    reg = rec.registration
    cpus = parse_resource_list(reg.resource_list).cpus_on(daemon.config.daemon.hostname or None)
    limit = limits.run_limit(daemon.config.daemon.max_run_containers, cpus)
    try:
        daemon.runs.take(reg.job_id, limit, limits.run_refusal(reg.job_id, limit))
    except CbatchError as exc:
        audit.refused(reg, peer.uid, "run", exc.message)
        raise
    try:
        try:
            with _pending(daemon, peer, "run"):
                sess = _prepare_run(daemon, conn, peer, rec, msg, fds)
        except CbatchError as exc:
            audit.refused(reg, peer.uid, "run", exc.message)
            raise
        if isinstance(sess, dict):
            audit.native(reg, peer.uid, "run", sess["reason"])
            return sess
        supervise(daemon, conn, sess)
        return None
    finally:
        daemon.runs.give(reg.job_id)


def _prepare_run(daemon, conn, peer, rec, msg, fds):
    reg = rec.registration
    argv, cwd, env = _request(msg, fds)
    options = protocol.get_str_list(msg, "options", [])
    if not argv:
        raise protocol.bad_field("argv", "a non-empty command")
    directives = parse_options(options)
    identity = Identity.lookup(reg.user)
    shell = identity.shell if identity.shell.startswith("/") else "/bin/sh"
    job = JobContext.for_start(reg, identity, shell, "", cwd, env, _cgroup_parent(reg, peer.pid),
                               peers.umask_of(peer.pid))
    resolve = _resolver(job)
    try:
        decision = policy.decide_run(daemon.config, job, directives, argv, resolve, next(_RUN_INDEX),
                                     _tags_of(daemon))
        if isinstance(decision, Native):
            return {"mode": "native", "reason": decision.reason}
        # stdin always goes through the attach socket: interactive input must work, and its EOF closes the
        # container's stdin.
        stdio, pump = choose_stdio(fds, attach_stdin=True, uid=peer.uid)
        return launch(daemon, conn, peer, job, decision, stdio, pump, fds, "run", opened=resolve.opened)
    finally:
        resolve.close()


def _pending(daemon, peer, op: str):
    """Hold one of the uid's ``daemon.max_pending_per_user`` slots while a request is prepared."""
    limit = daemon.config.daemon.max_pending_per_user
    # Waits (bounded) rather than refusing at once: 64 jobs of one user starting together on a big node are
    # normal; the cap only keeps one user from running more image checks and pulls at once than that.
    return daemon.pending.holding(peer.uid, limit, limits.pending_refusal(op, peer.uid, limit),
                                  limits.PENDING_WAIT)


def _tags_of(daemon):
    """The policy's ``tags_of`` (a digest reference is allowed as an allowed tag's image)."""
    return daemon.images.tags_of


def _proxy_again(daemon, cid: str, job_id: str, info: dict, fds) -> tuple:
    """``(tty_fd, pump_fds)`` for a session taken back: the streams the old daemon proxied (its record says
    which), now between the reattached client's own descriptors and a new attach stream. A terminal gets its
    input again; other stdin does not (Docker closed it when the old attach ended). Without a new stream the
    session goes on unproxied, as before, and says so in the log."""
    pump = ([bool(x) for x in (info.get("pump") or ())] + [False] * 3)[:3]
    tty = bool(info.get("tty"))
    none = (None, None, None)
    if not (tty or any(pump)) or len(fds) != 3 or not daemon.engine.proxied(cid):
        return None, none
    if tty and not os.isatty(fds[0]):
        log.error("job %s: container %s: the reattached client's stdin is no terminal: not proxied", job_id,
                  cid[:12])
        return None, none
    try:
        daemon.engine.reattach(cid, stdin=tty)
    except CbatchError as exc:
        log.error("job %s: container %s: its streams cannot be proxied again: %s", job_id, cid[:12], exc)
        return None, none
    if tty:
        return fds[0], none
    return None, (None, fds[1] if pump[1] else None, fds[2] if pump[2] else None)


def _int_or_none(value):
    """A recorded number (the registry is root's own file; still, only an int becomes a limit)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def attach(daemon, conn, peer, msg: dict, fds) -> None:
    """A client whose connection dropped (daemon restart) takes its container back."""
    job_id = protocol.get_str(msg, "job_id", None)
    cid = protocol.get_str(msg, "id", None)
    recovered = getattr(daemon, "recovered", None)
    if recovered is not None and not recovered.wait(ATTACH_WAIT):
        # Start-up recovery is still waiting for the engine: no answer yet, so the client asks again.
        raise DaemonError("attach", "not ready", "the daemon is still waiting for the engine", "try again")
    if cid is None:
        # The client lost us before it learnt its container's id (a restart mid-start): it is known by its
        # pid, uid and start time alone (take() checks all three).
        cid, job_id = recovery.waiting_for(daemon, peer)
    info = daemon.adoptions.take(cid, job_id, peer.pid, peer.uid) if cid and job_id else None
    if info is None:
        raise AccessDenied("attach", "no container is waiting for this client", (cid or f"pid {peer.pid}")[:64],
                           "only the original client may reattach, within the adoption window")
    tty_fd, pump_fds = _proxy_again(daemon, cid, job_id, info, fds)
    sess = Session(cid=cid, job_id=job_id, batch=str(info.get("batch", "torque")), kind=str(info.get("kind")),
                   peer_pid=peer.pid, uid=peer.uid, memory_limit=info.get("memory_limit"), tty_fd=tty_fd,
                   pump_fds=pump_fds, owned_fds=tuple(fds), user=str(info.get("user", "")),
                   queue=str(info.get("queue", "")),
                   image=str(info.get("image", "")), image_id=str(info.get("image_id", "")),
                   cgroup_parent=info.get("cgroup_parent"), cput_limit=_int_or_none(info.get("cput_limit")),
                   tm_port=_int_or_none(info.get("tm_port")),
                   started_wall=float(info.get("started_wall") or time.time()))
    try:       # an adopted cbatch run keeps its job's run slot (taken at recovery) until its session ends
        try:
            protocol.send(conn, {"ok": True, "event": "attached", "id": cid, "job_id": job_id})
        except CbatchError:
            cleanup.remove_container(daemon, job_id, cid)
            raise
        log.info("job %s: container %s: pid %d reattached", job_id, cid[:12], peer.pid)
        daemon.gate.promote(getattr(peer, "token", None))
        supervise(daemon, conn, sess)
    finally:
        daemon.adoptions.release_run(job_id, info)
    return None
