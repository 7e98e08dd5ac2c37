"""Starts pbs_mom makes through ``$job_starter`` besides the job itself: interactive jobs and TM tasks.

TORQUE 6.1 (src/resmom/start_exec.c) runs both through the job starter:

- ``qsub -I`` (TMomFinalizeChild -> setup_interactive_job): the child pbs_mom forked calls setsid(), runs the
  prologue (so the registered session id is that child's pid), then forks the shell child, which execs
  ``[starter, shell]`` (``[starter, shell, -c, cmd]`` with ``qsub -I -x cmd``) with the pty slave as
  stdin/stdout/stderr and ``PBS_ENVIRONMENT=PBS_INTERACTIVE``. So the starter is in the job's session but is
  *not* its leader: its parent is the leader (pid == the registered session id).
- A TM task (``pbsdsh``, ``mpiexec``; mom_comm.c:tm_spawn_request -> start_process ->
  become_the_jobs_subprocess): a fresh child of pbs_mom that calls setsid() (its own session, not the job's),
  stdin /dev/null (or the TM_STDIN_PORT socket), stdout/stderr the job's spool files (or TM sockets), cwd
  ``$HOME``/``PBS_O_INITDIR``, and execs ``[starter, argv...]``. No prologue, no stdin line.

Who may do what comes from /proc, never from the request: the interactive starter must be the child of the
registered session leader; a task must be a session leader whose parent is the same pbs_mom that started
the registered job (the parent of the job's session leader), run as the job's owner, for a job that has
started and whose session still runs. The job id a task names is read by root from /proc/<pid>/environ
(pbs_mom put PBS_JOBID there), then checked against those facts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

from cbatch import protocol
from cbatch.core.errors import AccessDenied, CbatchError, JobError
from cbatch.daemon import lifeline, peers

log = logging.getLogger("cbatchd")
MAX_ENVIRON = 4 << 20           # /proc/<pid>/environ is bounded by the kernel's ARG_MAX; read at most this
EXEC_POLL = 0.2                 # after the task's output ended, how often to ask the engine for its status
EXEC_STATUS_WAIT = 10.0         # ... and for how long before reporting it as lost


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (/proc/<pid>/stat field 4). AccessDenied if the process is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AccessDenied("peer", "process is gone", pid) from exc
    return int(data[data.rindex(b")") + 2:].split()[1])


def environ_value(pid: int, name: str) -> Optional[str]:
    """``name`` in the environment ``pid`` was exec'd with (read by root from /proc), or None."""
    try:
        with open(f"/proc/{int(pid)}/environ", "rb") as f:
            data = f.read(MAX_ENVIRON)
    except OSError:
        return None
    key = name.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode("utf-8", "surrogateescape")
    return None


def interactive_job(registry, pid: int, uid: int):
    """The record of the interactive job whose shell child ``pid`` is; AccessDenied otherwise."""
    sid = peers.session_of(pid)
    rec = registry.by_session(sid)
    if rec is None:
        raise AccessDenied("start", "no registered job has this session", f"pid {pid} in session {sid}",
                           "an interactive job's starter runs in the session the prologue registered")
    if sid == pid or parent_of(pid) != sid:
        raise AccessDenied("start", "peer is not the interactive job's shell child", f"pid {pid}",
                           f"its parent must be the session leader {sid}")
    job_uid = peers.owner_uid(rec.registration)
    if uid != job_uid:
        raise AccessDenied("start", "peer is not the job's owner",
                           f"uid {uid} for job {rec.registration.job_id} of uid {job_uid}")
    return rec


def task_job(registry, pid: int, uid: int):
    """The record of the running job whose TM task ``pid`` is; AccessDenied otherwise (see module doc)."""
    if peers.session_of(pid) != pid:
        raise AccessDenied("task", "peer is not a session leader", f"pid {pid}",
                           "pbs_mom starts every TM task in its own session")
    job_id = environ_value(pid, "PBS_JOBID")
    rec = registry.get(job_id) if job_id else None
    if rec is None or rec.registration.batch == "slurm":
        raise AccessDenied("task", "no registered job", job_id or f"pid {pid}",
                           "a TM task must belong to a job running on this node")
    reg = rec.registration
    leader = int(reg.session_id or 0)
    if not rec.started or not leader or not peers.alive(leader, None):
        raise AccessDenied("task", "the job is not running", reg.job_id)
    if registry.by_session(pid) is not None:
        raise AccessDenied("task", "peer is a job's own session leader", f"pid {pid}")
    if parent_of(pid) != parent_of(leader):
        raise AccessDenied("task", "peer was not started by the job's pbs_mom", f"pid {pid}",
                           f"its parent must be the parent of the job's session leader {leader}")
    job_uid = peers.owner_uid(reg)
    if uid != job_uid:
        raise AccessDenied("task", "peer is not the job's owner", f"uid {uid} for job {reg.job_id} of uid {job_uid}")
    return rec


def job_container(rec) -> Optional[tuple]:
    """``(cid, info)`` of the job's own container (kind ``job``), or None when it runs natively."""
    for cid, info in rec.containers.items():
        if info.get("kind") == "job" and not cid.startswith("pending:"):
            return cid, info
    return None


def task(daemon, conn, peer, msg: dict, fds) -> Optional[dict]:
    """A TM task: run its argv in the job's container (docker exec) or natively where the job is native."""
    from cbatch.core import policy
    from cbatch.core.directives import Directives
    from cbatch.core.job import Identity, JobContext

    rec = task_job(daemon.registry, peer.pid, peer.uid)
    reg = rec.registration
    argv = protocol.get_str_list(msg, "argv")
    cwd = protocol.get_str(msg, "cwd")
    env = protocol.get_pairs(msg, "env")
    if len(argv) < 2:
        raise protocol.bad_field("argv", "[starter, command, args...]")
    if len(fds) != 3:
        raise protocol.bad_field("fds", "exactly stdin, stdout and stderr as SCM_RIGHTS")
    found = job_container(rec)
    if found is None:
        log.info("job %s: TM task pid %d runs natively (the job does)", reg.job_id, peer.pid)
        return {"mode": "native", "reason": "the job runs natively"}
    cid, info = found
    identity = Identity.lookup(reg.user)
    image = str(info.get("image") or "")
    job = JobContext.for_start(reg, identity, identity.shell if identity.shell.startswith("/") else "/bin/sh",
                               "", cwd, env)
    qpolicy = daemon.config.queue(reg.queue)
    task_env = {k: v for k, v, _layer in policy.environment(qpolicy, job, Directives(), image)}
    eid, sock = daemon.engine.exec_start(cid, argv[1:], task_env, cwd, identity.uid, identity.gid,
                                         identity.groups, peers.umask_of(peer.pid))
    log.info("job %s: TM task pid %d joined container %s (exec %s): %s", reg.job_id, peer.pid, cid[:12],
             eid[:12], argv[1][:200])
    protocol.send(conn, {"ok": True, "event": "started", "id": cid, "exec": eid, "job_id": reg.job_id,
                         "task": True})
    _supervise_exec(daemon, conn, peer, reg.job_id, eid, sock, fds)
    return None


PROXY_STOP = 5.0        # seconds to wait for a stopped proxy thread (it returns at its next poll)


def _supervise_exec(daemon, conn, peer, job_id: str, eid: str, sock, fds) -> None:
    """Proxy the task's stdio, forward its signals, report its exit; kill it if its starter goes away."""
    from cbatch.daemon.streams import Pump

    done = threading.Event()
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
    try:
        # The pump works on its own opens of the task's descriptors, built here, stopped and joined below
        # before anything of this session is closed (a descriptor number must never outlive its owner).
        proxy = Pump(sock, fds[0], fds[1], fds[2])
    except (CbatchError, OSError):
        for fd in (wake_r, wake_w):
            os.close(fd)
        raise

    def pumper() -> None:
        try:
            proxy.run()
        except Exception as exc:  # noqa: BLE001 - the client may close its end at any time
            log.info("job %s: exec %s: proxy ended: %s", job_id, eid[:12], exc)
        finally:
            done.set()
            os.write(wake_w, b"x")      # wake_w is closed only after this thread has been joined

    thread = threading.Thread(target=pumper, name=f"exec-{eid[:12]}", daemon=True)
    thread.start()

    def on_message(msg: dict) -> None:
        try:
            if protocol.check_version(msg) == "signal":
                _signal_exec(daemon, eid, protocol.get_int(msg, "signum", lo=1, hi=64))
        except CbatchError as exc:
            log.warning("job %s: exec %s: ignored message: %s", job_id, eid[:12], exc)

    try:
        if lifeline.serve(conn, wake_r, done, on_message) is not None:
            log.warning("job %s: exec %s: its starter pid %d went away: killing the task", job_id, eid[:12],
                        peer.pid)
            _signal_exec(daemon, eid, signal.SIGKILL)
            return
        status = _exec_status(daemon, eid)
        reply = {"event": "exit", "status": 125 if status is None else status, "oom": False,
                 "message": None if status is not None else
                 JobError(f"job {job_id}", "TM task lost", eid[:12], "its container ended").message}
        try:
            protocol.send(conn, reply)
        except CbatchError as exc:
            log.warning("job %s: could not report a task's exit to pid %d: %s", job_id, peer.pid, exc)
    finally:
        proxy.stop()
        thread.join(PROXY_STOP)
        if thread.is_alive():       # cannot happen (it waits only in poll beside the stop pipe): keep its fds
            log.error("job %s: exec %s: proxy did not stop: keeping its descriptors", job_id, eid[:12])
            return
        proxy.close()
        for obj in (sock, conn):
            try:
                obj.close()
            except OSError:
                pass
        for fd in (wake_r, wake_w, *fds):
            try:
                os.close(fd)
            except OSError:
                pass


def _exec_status(daemon, eid: str) -> Optional[int]:
    """The task's exit code once the engine says it ended (its output closes a moment before)."""
    deadline = time.monotonic() + EXEC_STATUS_WAIT
    while True:
        try:
            running, code, _pid = daemon.engine.exec_state(eid)
        except CbatchError:
            return None             # the container (and the task with it) is gone: the job ended
        if not running and code is not None:
            return code if 0 <= code < 256 else 125
        if time.monotonic() >= deadline:
            return None
        time.sleep(EXEC_POLL)


def _signal_exec(daemon, eid: str, signum: int) -> None:
    """Signal the task's process on the host (root) while the engine still says it runs (no recycled pid)."""
    try:
        running, _code, pid = daemon.engine.exec_state(eid)
    except CbatchError:
        return
    if running and pid > 0:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
