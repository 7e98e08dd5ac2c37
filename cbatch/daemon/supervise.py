"""Running one container for one client connection (a job starter or ``cbatch run``).

The connection *is* the job's lifeline: while the container runs we read ``signal`` messages from it (SIGTERM
becomes stop: TERM, then KILL after ``daemon.stop_grace``); when the container exits we send the exit event,
remove the container and close. If the connection closes first, the client is gone (SIGKILLed starter) and
the container is killed and removed at once - nobody else would stop it.

Stdio choice (:func:`choose_stdio`): a stdout/stderr fd that is a regular file still named by its path is
bind-mounted and appended to by the in-container helper, so the job's output never passes through Python;
anything else (pipe, terminal, deleted file) is proxied through the engine's attach socket by
:func:`cbatch.daemon.streams.pump` in a thread.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from cbatch import protocol
from cbatch.core.errors import CbatchError, EngineError, JobError

log = logging.getLogger("cbatchd")
ENGINE_RETRY = 60.0       # how long a session keeps waiting for an engine that went away (dockerd restart)
PUMP_DRAIN = 2.0          # after exit, how long the proxy may take to flush the last output


def file_path(fd: int, uid: int) -> Optional[str]:
    """The path naming the regular file open as ``fd``, or None (pipe, tty, deleted, renamed, read-only,
    or not owned by ``uid``).

    The path comes from ``/proc/self/fd`` and must still name the same file (device and inode) - otherwise
    the engine would bind-mount something other than what the client handed us. Only the client's own files
    are bind-mounted: a bind mount skips the directory permissions on the way to the file, so a file
    someone else owns is written through the proxy instead.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return None
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return None     # not opened for writing by the client: do not hand it a writable mount
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return None
        lst = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(lst.st_mode) or (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
        return None
    return path


def choose_stdio(fds: Sequence[int], attach_stdin: bool, uid: int):
    """``(engine.Stdio, pump fds (stdin, stdout, stderr))`` for the client's fds 0, 1, 2 (client ``uid``)."""
    from cbatch.engines.docker import Stdio

    out = file_path(fds[1], uid) if len(fds) > 1 else None
    err = file_path(fds[2], uid) if len(fds) > 2 else None
    pump = (fds[0] if attach_stdin and fds else None,
            None if out or len(fds) < 2 else fds[1],
            None if err or len(fds) < 3 else fds[2])
    attach = any(fd is not None for fd in pump)
    return Stdio(stdout_path=out, stderr_path=err, attach=attach), pump


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
    image: str = ""                 # the image it runs (TM tasks joining it get the same CBATCH_IMAGE)
    tty_fd: Optional[int] = None    # interactive: the job's terminal, proxied raw (cbatch.daemon.ttyproxy)
    started_at: float = field(default_factory=time.monotonic)

    def record(self) -> dict:
        """What the registry keeps so a restarted daemon can adopt the container."""
        from cbatch.daemon import peers
        return {"peer": self.peer_pid, "peer_start": peers.start_time(self.peer_pid), "kind": self.kind,
                "uid": self.uid, "memory_limit": self.memory_limit, "batch": self.batch, "image": self.image}


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

    saved_tty = None
    if sess.tty_fd is not None:
        from cbatch.daemon import ttyproxy
        try:
            sock = engine.attach(sess.cid)
        except CbatchError as exc:
            log.error("job %s: container %s: no terminal: %s", sess.job_id, sess.cid[:12], exc)
        else:
            saved_tty = ttyproxy.make_raw(sess.tty_fd)
            _resize(daemon, sess)

            def tty_pumper() -> None:
                try:
                    ttyproxy.pump(sock, sess.tty_fd)
                except Exception as exc:  # noqa: BLE001 - the terminal may go away at any time
                    log.info("job %s: container %s: terminal proxy ended: %s", sess.job_id, sess.cid[:12], exc)
            pump_thread = threading.Thread(target=tty_pumper, name=f"tty-{sess.cid[:12]}", daemon=True)
            pump_thread.start()
    elif any(fd is not None for fd in sess.pump_fds):
        try:
            sock = engine.attach(sess.cid)
        except CbatchError as exc:
            log.error("job %s: container %s: no attach socket: %s", sess.job_id, sess.cid[:12], exc)
        else:
            def pumper() -> None:
                try:
                    from cbatch.daemon.streams import pump
                    pump(sock, *sess.pump_fds)
                except Exception as exc:  # noqa: BLE001 - the client may close its end at any time
                    log.info("job %s: container %s: output proxy ended: %s", sess.job_id, sess.cid[:12], exc)
            pump_thread = threading.Thread(target=pumper, name=f"pump-{sess.cid[:12]}", daemon=True)
            pump_thread.start()
    threading.Thread(target=waiter, name=f"wait-{sess.cid[:12]}", daemon=True).start()

    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)
    poller.register(wake_r, select.POLLIN)
    try:
        while not done.is_set():
            # Blocks until the client says something (a signal, or EOF when it dies) or the container exits.
            if not any(fd == conn.fileno() for fd, _ev in poller.poll()):
                continue
            try:
                msg, fds = protocol.recv(conn)
            except CbatchError as exc:
                if done.is_set():
                    break
                # The client is gone (a SIGKILLed starter, a killed cbatch run): nobody else will stop it.
                log.warning("job %s: container %s: client pid %d went away (%s): killing it", sess.job_id,
                            sess.cid[:12], sess.peer_pid, exc.problem)
                _remove(daemon, sess)
                return
            for fd in fds:
                os.close(fd)
            _handle(daemon, sess, msg)
        if pump_thread is not None:
            pump_thread.join(PUMP_DRAIN)
        reply = _exit_event(sess, result)
        log.info("job %s: container %s exited: status %s%s", sess.job_id, sess.cid[:12], reply["status"],
                 " (out of memory)" if reply["oom"] else "")
        try:
            protocol.send(conn, reply)
        except CbatchError as exc:
            log.warning("job %s: could not report the exit to pid %d: %s", sess.job_id, sess.peer_pid, exc)
        _remove(daemon, sess)
    finally:
        if saved_tty is not None:
            from cbatch.daemon import ttyproxy
            ttyproxy.restore(sess.tty_fd, saved_tty)
        try:
            conn.close()
        except OSError:
            pass
        os.close(wake_r)            # the waiter closes wake_w when it ends
        for fd in sess.owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass


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


def _remove(daemon, sess: Session) -> None:
    if sess.name and getattr(daemon, "mount_root", None):
        from cbatch.daemon import pinning
        pinning.release(daemon.mount_root, sess.name)    # normally gone since the start; idempotent
    try:
        daemon.engine.remove(sess.cid)
    except CbatchError as exc:
        log.error("job %s: could not remove container %s: %s", sess.job_id, sess.cid[:12], exc)
        return
    daemon.registry.drop_container(sess.job_id, sess.cid)
