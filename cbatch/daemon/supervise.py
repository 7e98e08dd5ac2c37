"""Running one container for one client connection (a job starter or ``cbatch run``).

The connection *is* the job's lifeline: while the container runs we read ``signal`` messages from it (SIGTERM
becomes stop: TERM, then KILL after ``daemon.stop_grace``); when the container exits we send the exit event,
remove the container and close. If the connection closes first, the client is gone (SIGKILLed starter) and
the container is killed and removed at once - nobody else would stop it.

Proxied stdio (:mod:`cbatch.daemon.streams`) runs in a pump thread that the session stops and joins before it
closes any descriptor: no thread of a session outlives it, and no descriptor number is used after its close.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Tuple

from cbatch import protocol
from cbatch.daemon import audit, cleanup, cputwatch, lifeline, peers, pinning, streams, tmrelay
from cbatch.core.errors import CbatchError, EngineError, JobError

log = logging.getLogger("cbatchd")
ENGINE_RETRY = 60.0       # how long a session keeps waiting for an engine that went away (dockerd restart)
PUMP_DRAIN = 2.0          # after exit, how long the proxy may take to flush the last output
PUMP_STOP = 10.0          # a stopped pump returns at its next poll; longer means a bug (then its fds leak)


def oom_message(job_id: str, limit: Optional[int], batch: str) -> str:
    """The one line a user sees when the job's container ran out of memory."""
    hint = "request more with sbatch --mem=..." if batch == "slurm" else "request more with qsub -l mem=..."
    value = f"out of memory: limit {max(1, limit // (1 << 20))} MiB" if limit else "out of memory"
    return JobError(f"job {job_id}", "killed", value, hint).message


@dataclass
class Session:
    """A running container and what is needed to report on it."""

    cid: str
    job_id: str
    batch: str
    kind: str
    peer_pid: int
    uid: int
    memory_limit: Optional[int] = None
    pump_fds: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None)
    owned_fds: Tuple[int, ...] = ()
    name: str = ""                  # the container name (its pinned-mount staging directory), when known
    tty_fd: Optional[int] = None    # interactive: the job's terminal, proxied raw (cbatch.daemon.ttyproxy)
    # For the audit line (cbatch.daemon.audit); image is also what TM tasks joining it get as CBATCH_IMAGE:
    user: str = ""
    queue: str = ""
    image: str = ""
    image_id: str = ""
    cgroup_parent: Optional[str] = None
    cput_limit: Optional[int] = None   # seconds; enforced by cbatch.daemon.cputwatch without a TORQUE job cgroup
    tm_port: Optional[int] = None      # the job's TM port relayed into its container (cbatch.daemon.tmrelay)
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)   # kept across a daemon restart (the record)

    def record(self) -> dict:
        """What the registry keeps so a restarted daemon can adopt the container."""
        return {"peer": self.peer_pid, "peer_start": peers.start_time(self.peer_pid), "kind": self.kind,
                "uid": self.uid, "memory_limit": self.memory_limit, "batch": self.batch, "user": self.user,
                "queue": self.queue, "image": self.image, "image_id": self.image_id,
                "cgroup_parent": self.cgroup_parent, "cput_limit": self.cput_limit,
                "started_wall": self.started_wall, "tm_port": self.tm_port,
                # Which of the client's streams the daemon proxies (a restarted daemon proxies them again).
                "tty": self.tty_fd is not None, "pump": [fd is not None for fd in self.pump_fds]}


def supervise(daemon, conn, sess: Session) -> None:
    """Watch ``sess`` until its container exits or the client goes; always ends with the container removed.

    ``daemon`` provides ``engine``, ``config``, ``registry``. The caller has already sent the ``started``
    (or ``attached``) event. Closes ``conn`` and the session's fds.
    """
    engine = daemon.engine
    done = threading.Event()
    result: dict = {}
    pump_thread = None
    # The waiter wakes the loop below through this pipe the moment the container exits: the job's exit
    # path (and so every job's turnaround) must not wait for a poll timeout.
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)

    def waiter() -> None:
        try:
            result["info"] = _wait_through_engine_restarts(engine, sess)
        except CbatchError as exc:
            result["error"] = exc
        except Exception as exc:  # noqa: BLE001 - a bug here must still end the session
            result["error"] = EngineError("container", "wait failed", sess.cid, f"{type(exc).__name__}: {exc}")
        finally:
            done.set()
            try:
                os.write(wake_w, b"x")
            except OSError:         # the session already ended (client gone) and closed its end
                pass
            os.close(wake_w)

    pump = None
    saved_tty = None
    if sess.tty_fd is not None:
        from cbatch.daemon import ttyproxy
        try:
            pump = ttyproxy.TtyPump(engine.attach(sess.cid), sess.tty_fd)
        except (CbatchError, OSError) as exc:
            log.error("job %s: container %s: no terminal: %s", sess.job_id, sess.cid[:12], exc)
        else:
            saved_tty = ttyproxy.make_raw(sess.tty_fd)
            _resize(daemon, sess)
            pump_thread = _run_proxy(sess, pump, "tty")
    elif any(fd is not None for fd in sess.pump_fds):
        try:
            pump = streams.Pump(engine.attach(sess.cid), *sess.pump_fds)
        except (CbatchError, OSError) as exc:
            log.error("job %s: container %s: no output proxy: %s", sess.job_id, sess.cid[:12], exc)
        else:
            pump_thread = _run_proxy(sess, pump, "pump")
    threading.Thread(target=waiter, name=f"wait-{sess.cid[:12]}", daemon=True).start()
    watch = cputwatch.start(daemon, sess)
    relay = tmrelay.start(daemon, sess)

    try:
        gone = lifeline.serve(conn, wake_r, done, lambda msg: _handle(daemon, sess, msg))
        if gone is not None:
            # The client is gone (a SIGKILLed starter, a killed cbatch run): nobody else will stop it.
            log.warning("job %s: container %s: client pid %d went away (%s): killing it", sess.job_id,
                        sess.cid[:12], sess.peer_pid, gone.problem)
            _stop_pump(sess, pump, pump_thread, 0.0)
            _remove(daemon, sess)
            audit.job_end(sess, None, False, time.time() - sess.started_wall, "client went away: killed")
            return
        _stop_pump(sess, pump, pump_thread, PUMP_DRAIN)
        reply = _with_line(_exit_event(sess, result), cputwatch.stop(daemon, watch))
        log.info("job %s: container %s exited: status %s%s", sess.job_id, sess.cid[:12], reply["status"],
                 " (out of memory)" if reply["oom"] else "")
        try:
            protocol.send(conn, reply)
        except CbatchError as exc:
            log.warning("job %s: could not report the exit to pid %d: %s", sess.job_id, sess.peer_pid, exc)
        _remove(daemon, sess)
        audit.job_end(sess, reply["status"], reply["oom"], time.time() - sess.started_wall,
                      reply.get("message") or "", result.get("info"))
    finally:
        cputwatch.stop(daemon, watch)     # no watcher outlives its session (idempotent)
        tmrelay.stop(relay)
        # Whatever happened above, the pump stops before any descriptor it might use is closed.
        pump_alive = _stop_pump(sess, pump, pump_thread, 0.0)
        if saved_tty is not None:
            from cbatch.daemon import ttyproxy
            ttyproxy.restore(sess.tty_fd, saved_tty)
        try:
            conn.close()
        except OSError:
            pass
        os.close(wake_r)            # the waiter closes wake_w when it ends
        for fd in () if pump_alive else sess.owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _run_proxy(sess: Session, proxy, what: str) -> threading.Thread:
    """Run ``proxy`` (a :class:`cbatch.daemon.streams.Stoppable`) in its own thread; :func:`_stop_pump`
    ends it."""
    def run() -> None:
        try:
            proxy.run()
        except Exception as exc:  # noqa: BLE001 - a bug, or a terminal gone, must still end the session
            log.error("job %s: container %s: %s proxy failed: %s", sess.job_id, sess.cid[:12], what, exc)
    thread = threading.Thread(target=run, name=f"{what}-{sess.cid[:12]}", daemon=True)
    thread.start()
    return thread


def _stop_pump(sess: Session, pump, thread, drain: float) -> bool:
    """Let the pump flush for up to ``drain`` seconds, then stop it, join it and close its descriptors.
    Idempotent. True if the thread is (impossibly) still running: then nothing it uses may be closed."""
    if pump is None or thread is None:
        return False
    if drain:
        thread.join(drain)
    pump.stop()
    thread.join(PUMP_STOP)
    if thread.is_alive():
        log.error("job %s: container %s: output proxy did not stop: keeping its descriptors", sess.job_id,
                  sess.cid[:12])
        return True
    pump.close()
    return False


def _wait_through_engine_restarts(engine, sess: Session):
    """``engine.wait``, again while the engine itself is unreachable (dockerd restarting) for up to
    :data:`ENGINE_RETRY` seconds: the container may well still run (live-restore) or have left its exit status.
    A wait that fails twice in a row while the engine answers ping is final (the container is gone)."""
    deadline, failed_while_up = None, 0
    while True:
        try:
            return engine.wait(sess.cid)
        except CbatchError as exc:
            try:
                up = engine.ping()
            except CbatchError:
                up = False
            failed_while_up = failed_while_up + 1 if up else 0
            now = time.monotonic()
            deadline = deadline or now + ENGINE_RETRY
            if failed_while_up >= 2 or now >= deadline:
                raise
            log.warning("job %s: container %s: engine unreachable (%s): waiting for it", sess.job_id,
                        sess.cid[:12], exc.problem)
            time.sleep(1.0)


def _handle(daemon, sess: Session, msg: dict) -> None:
    """One message on an open session: only ``signal`` is meaningful; anything else is logged."""
    try:
        op = protocol.check_version(msg)
        if op != "signal":
            raise JobError("session", "unexpected request", op, "only signal is accepted while a job runs")
        signum = protocol.get_int(msg, "signum", lo=1, hi=64)
    except CbatchError as exc:
        log.warning("job %s: pid %d: ignored message: %s", sess.job_id, sess.peer_pid, exc)
        return
    if signum == signal.SIGWINCH:
        if sess.tty_fd is not None:     # the job's terminal was resized: so is the container's
            threading.Thread(target=_resize, args=(daemon, sess), daemon=True).start()
        return
    if signum == signal.SIGTERM:
        grace = daemon.config.daemon.stop_grace
        log.info("job %s: SIGTERM: stopping container %s (grace %.1f s)", sess.job_id, sess.cid[:12], grace)
        target, args = daemon.engine.stop, (sess.cid, grace)
    else:
        target, args = daemon.engine.signal, (sess.cid, signum)

    def act() -> None:
        try:
            target(*args)
        except CbatchError as exc:
            log.error("job %s: signal %d to %s failed: %s", sess.job_id, signum, sess.cid[:12], exc)
    # In a thread: stop() takes up to the grace period, and we keep reading the connection meanwhile.
    threading.Thread(target=act, daemon=True).start()


def _resize(daemon, sess: Session) -> None:
    """Give the container's terminal the size of the job's terminal."""
    from cbatch.daemon import ttyproxy
    size = ttyproxy.window_size(sess.tty_fd)
    if size is None:
        return
    try:
        daemon.engine.resize(sess.cid, *size)
    except CbatchError as exc:
        log.info("job %s: container %s: resize to %s failed: %s", sess.job_id, sess.cid[:12], size, exc)


def _exit_event(sess: Session, result: dict) -> dict:
    info = result.get("info")
    if info is None:
        err = result.get("error") or EngineError("container", "lost", sess.cid)
        return {"event": "exit", "status": 125, "oom": False, "message": err.message}
    status = info.status if 0 <= info.status < 256 else 125
    lines = []
    if info.oom_killed:
        # The engine flags the container when the kernel killed ANY of its processes for memory: a child the
        # script survives (and whose loss it may handle) must not replace the script's own status. The line
        # is reported either way; the status is the script's (137 only when the script itself was killed).
        lines.append(oom_message(sess.job_id, sess.memory_limit, sess.batch))
    if info.error:
        lines.append(EngineError("container", "failed", sess.cid[:12], info.error).message)
    if getattr(info, "notice", None):       # e.g. the writable layer filled up: one line at the end
        lines.append(info.notice)
    message = "\n".join(lines) or None
    return {"event": "exit", "status": status, "oom": bool(info.oom_killed), "message": message}


def _with_line(reply: dict, line: Optional[str]) -> dict:
    """The exit event with ``line`` (why cbatch stopped the container) first in its message."""
    if line:
        reply["message"] = "\n".join(filter(None, (line, reply.get("message"))))
    return reply


def _remove(daemon, sess: Session) -> None:
    if sess.name:
        pinning.release(daemon.mount_root, sess.name)    # normally gone since the start; idempotent
    cleanup.remove_container(daemon, sess.job_id, sess.cid)
