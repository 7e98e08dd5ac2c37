"""cbatchd: the root daemon, the only process that talks to the container engine.

``cbatchd [--config FILE] [--foreground]``. It listens on ``daemon.socket`` (0666 in a 0755 directory) and
learns who is asking from SO_PEERCRED only. Every connection is served in its own thread; a connection is
bounded (1 MiB frames, 5 s to finish a frame, ``daemon.idle_timeout`` to send the request, per-uid and shared
caps on connections: :mod:`cbatch.daemon.limits`) so one bad client cannot stop the others. Requests:

- ``ping`` (anyone), ``status`` (root): health and the registered jobs (:mod:`cbatch.daemon.ops`).
- ``register`` / ``unregister`` (root: the prologue and epilogue): the job registry (:mod:`cbatch.daemon.registry`,
  :mod:`cbatch.daemon.ops`).
- ``start`` (the job starter), ``run`` (``cbatch run``), ``attach`` (a client reconnecting after a daemon
  restart): see :mod:`cbatch.daemon.launch` and :mod:`cbatch.daemon.supervise`.

Restart without losing jobs: registrations and the containers we supervise are in ``daemon.state_dir``;
on start-up containers of this instance that no registered job claims are removed, and containers whose
client is still alive wait :data:`cbatch.daemon.adoptions.ADOPT_WAIT` seconds for it to ``attach`` again
(:mod:`cbatch.daemon.recovery`). Stopping the daemon (SIGTERM) never stops jobs' containers.

SIGHUP reloads the config file (:meth:`Daemon.reload`): a valid file applies to every request from then on;
a broken one is one log line and the old config stays. Keys bound at start (socket, state_dir, instance,
mount_dir, engine, syslog) need a restart: a reload keeps their old values and says so.

Every module the daemon needs is imported when it starts: a broken install stops it at start, never
half-way through a job (fail closed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time

from cbatch import protocol
from cbatch.core import config as config_mod
from cbatch.core.errors import AccessDenied, CbatchError, DaemonError
from cbatch.daemon import cleanup, launch, limits, ops, peers, recovery
from cbatch.daemon.adoptions import Adoptions
from cbatch.daemon.imagesync import ImageManager
from cbatch.daemon.registry import Registry
from cbatch.engines.direct import DirectEngine
from cbatch.engines.docker import Engine
from cbatch.engines.imagecache import InfoCache
from cbatch.engines.imagewatch import ImageWatch
from cbatch.engines.router import Router, bundles_dir
from cbatch.host import paths

log = logging.getLogger("cbatchd")
DEFAULT_CONFIG = "/etc/cbatch/cbatch.yaml"
BACKLOG = 1024      # a connection flood must not make other clients' connect() fail at once
TORQUE_KILL_DELAY = 2.0
# Keys a running daemon cannot change (bound sockets, state and mounts in use, the engine client, logging).
RESTART_ONLY = ("socket", "state_dir", "instance", "mount_dir", "syslog")
ROOT_OPS = ("register", "unregister", "status")


class Peer:
    """The other end of a connection, from SO_PEERCRED."""

    def __init__(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.token = None     # its ConnectionGate admission (cbatch.daemon.limits)

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


class Daemon:
    """State shared by every connection: config, engine, registry, pending adoptions."""

    def __init__(self, config, config_path: str = DEFAULT_CONFIG) -> None:
        self.config = config
        self.config_path = config_path
        self.instance = config.daemon.instance or config.daemon.hostname or socket.gethostname()
        docker = Engine(config.engine.url, config.engine.timeout)
        # Both engines always: a queue's engine key may change on reload, and recovery must find both kinds.
        self.engine = Router(docker, DirectEngine(docker, bundles_dir(config.daemon.mount_dir), self.instance,
                                                  timeout=config.engine.timeout))
        self.registry = Registry(config.daemon.state_dir)
        self.mount_root = os.path.join(config.daemon.mount_dir, self.instance)   # cbatch.daemon.pinning staging
        self.gate = limits.ConnectionGate(config.daemon.max_connections, config.daemon.max_connections_per_user)
        self.pending = limits.Counter()    # start/run requests being prepared, per uid
        self.runs = limits.Counter()       # cbatch run containers, per job id
        self.adoptions = Adoptions(runs=self.runs)   # containers waiting for their client after a restart
        self.starts = cleanup.StartsInFlight()     # a job's cleanup waits for its starts in flight
        self.sweeping = threading.Lock()   # one forget_ended_jobs at a time
        self.started_at = time.time()      # registrations older than this may have missed their epilogue
        self.stopping = False
        self.listener = None
        self._refusals, self._refusal_logged = 0, 0.0
        self._reloading = threading.Lock()
        # Image checks answered from memory while Docker's image event stream says nothing changed.
        self.image_cache = InfoCache()
        self.image_watch = ImageWatch(docker, self.image_cache, log)
        self.images = ImageManager(self.engine, config, log, cache=self.image_cache)   # pre-pull, checks, op

    # -- start-up and reload ------------------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile the engine with the registry after a (re)start: :func:`cbatch.daemon.recovery.recover`."""
        recovery.recover(self)
        try:
            self.engine.direct.adopt()      # images of surviving direct containers stay held
        except CbatchError as exc:
            log.warning("recover: direct engine image holds: %s", exc)

    def forget_ended_jobs(self) -> None:
        """Unregister Torque jobs whose session ended while nobody could: :func:`cbatch.daemon.recovery.forget_ended_jobs`."""
        recovery.forget_ended_jobs(self)

    def reload(self) -> bool:
        """Read the config file again (SIGHUP). A valid one applies to requests from now on (running jobs keep
        what they started with); a broken one leaves the old config, with one log line. True if applied."""
        with self._reloading:
            try:
                new = config_mod.load(self.config_path, trusted=True)
            except CbatchError as exc:
                log.error("reload: keeping the old config: %s", exc.message)
                return False
            old = self.config
            kept = [k for k in RESTART_ONLY if getattr(new.daemon, k) != getattr(old.daemon, k)]
            if new.engine != old.engine:
                kept.append("engine")
            if kept:
                log.warning("reload: %s need a restart: keeping their old values",
                            ", ".join(("daemon." + k) if k != "engine" else k for k in kept))
                new = dataclasses.replace(new, engine=old.engine, daemon=dataclasses.replace(
                    new.daemon, **{k: getattr(old.daemon, k) for k in RESTART_ONLY}))
            self.gate.reconfigure(new.daemon.max_connections, new.daemon.max_connections_per_user)
            self.config = new
            self.images.reconfigure(new)
            log.info("reload: %s applied", self.config_path)
            return True

    # -- serving ------------------------------------------------------------------------------------
    def listen(self) -> socket.socket:
        """Bind the unix socket (replacing a stale one, refusing if another daemon answers there)."""
        path = self.config.daemon.socket
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise DaemonError("daemon", "socket path exists and is not a socket", path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise DaemonError("daemon", "another cbatchd is already listening", path)
            except OSError:
                os.unlink(path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o111)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o666)     # anyone may connect; SO_PEERCRED decides what they may do
        sock.listen(BACKLOG)
        self.listener = sock
        return sock

    def serve_forever(self) -> None:
        """Accept connections until stopped; each gets its own thread."""
        sock = self.listener or self.listen()
        self.image_watch.start()
        self.images.start()
        log.info("cbatchd listening on %s (instance %s, %d registered jobs)", self.config.daemon.socket,
                 self.instance, len(self.registry))
        while not self.stopping:
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self.stopping:
                    break
                log.error("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            try:
                peer = Peer(conn)
                token = peer.token = self.gate.admit(peer.uid, self._has_job)
            except (OSError, CbatchError) as exc:
                self._refused_connection(exc)
                # Non-blocking: the accept loop must never wait on a client.
                _refuse(conn, exc if isinstance(exc, CbatchError) else DaemonError("daemon", "busy", str(exc)),
                        wait=0.0)
                continue
            try:
                threading.Thread(target=self._serve_one, args=(conn, peer, token), daemon=True).start()
            except RuntimeError as exc:     # no more threads: refuse this one, keep serving
                self.gate.release(token)
                self._refused_connection(exc)
                _refuse(conn, DaemonError("daemon", "busy", str(exc)), wait=0.0)

    def _has_job(self, uid: int) -> bool:
        """Is a job of ``uid`` registered here (its connections bypass the shared pool)?"""
        for rec in self.registry.all():
            try:
                if peers.owner_uid(rec.registration) == uid:
                    return True
            except CbatchError:
                continue
        return False

    def _refused_connection(self, exc) -> None:
        # One log line per second at most: a flood of refusals must not become a flood of log lines.
        now = time.monotonic()
        self._refusals += 1
        if now - self._refusal_logged >= 1.0:
            log.error("refusing connections: %s (%d refused)", getattr(exc, "message", exc), self._refusals)
            self._refusal_logged, self._refusals = now, 0

    def _serve_one(self, conn: socket.socket, peer: "Peer", token) -> None:
        keep = False
        msg = None
        fds = []
        try:
            msg, fds = protocol.recv(conn, timeout=self.config.daemon.idle_timeout)
            op = protocol.check_version(msg)
            if op in ROOT_OPS and peer.uid != 0:
                raise AccessDenied(op, "only root may do this", f"uid {peer.uid}")
            handler = _HANDLERS.get(op)
            if handler is None:
                raise DaemonError("request", "unknown op", op, " | ".join(sorted(_HANDLERS)))
            reply = handler(self, conn, peer, msg, fds)
            if reply is None:
                keep = True     # a session took over the connection (and the fds)
            else:
                protocol.send(conn, {"ok": True, **reply})
        except protocol.Closed:
            pass
        except CbatchError as exc:
            log.warning("refused %s from %s: %s", _op_of(msg), peer or "?", exc.message)
            _refuse(conn, exc)
            conn = None
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the daemon down
            log.exception("internal error serving %s", peer or "?")
            _refuse(conn, DaemonError("daemon", "internal error", f"{type(exc).__name__}: {exc}"))
            conn = None
        finally:
            if not keep:
                for fd in fds:
                    _close_fd(fd)
                if conn is not None:
                    conn.close()
            self.gate.release(token)


def _op_of(msg) -> str:
    return str(msg.get("op"))[:40] if isinstance(msg, dict) else "request"


def _refuse(conn, err: CbatchError, wait: float = 1.0) -> None:
    """Send one error reply if the connection still takes it (within ``wait`` seconds), then close."""
    if conn is None:
        return
    try:
        conn.settimeout(wait)
        protocol.send(conn, {"ok": False, "error": err.to_wire()})
    except (CbatchError, OSError):
        pass
    finally:
        conn.close()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_HANDLERS = {"ping": ops.ping, "status": ops.status, "images": ops.images,
             "register": ops.register, "unregister": ops.unregister,
             "start": launch.start, "run": launch.run, "attach": launch.attach}


def setup_logging(foreground: bool, syslog_path: str = "/dev/log") -> None:
    """Where the log goes: under systemd (JOURNAL_STREAM set) stderr, which is the journal (journald also
    owns /dev/log: one handler, no duplicates); otherwise syslog at ``syslog_path`` (``daemon.syslog``) when
    it exists, and stderr too in --foreground (tests and admins read it there). The audit lines
    (:mod:`cbatch.daemon.audit`) go wherever the log goes."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = []
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    if not journal and syslog_path and os.path.exists(syslog_path):
        try:
            h = logging.handlers.SysLogHandler(address=syslog_path,
                                               facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            h.setFormatter(logging.Formatter("cbatchd[%(process)d]: %(levelname)s %(message)s"))
            handlers.append(h)
        except OSError as exc:
            print(f"cbatchd: syslog {syslog_path}: {exc}", file=sys.stderr)
    if journal or foreground or not handlers:
        fmt = "%(levelname)s %(message)s" if journal else "%(asctime)s cbatchd %(levelname)s %(message)s"
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(fmt))
        handlers.append(h)
    for h in handlers:
        root.addHandler(h)


def write_pidfile(path: str) -> None:
    """Our pid in ``path`` (root-owned 0644, replaced atomically; never through a symlink)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Entry point of ``cbatchd``."""
    p = argparse.ArgumentParser(prog="cbatchd", description="cbatch's root daemon")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--foreground", action="store_true", help="do not detach (systemd, tests)")
    p.add_argument("--pidfile", help="write the daemon's pid here once it listens (init scripts)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # a reload before we are ready is not an exit
    try:
        cfg = config_mod.load(args.config, trusted=True)
    except CbatchError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    if not args.foreground:
        import daemon as pydaemon     # python-daemon
        ctx = pydaemon.DaemonContext(umask=0o022, working_directory="/",
                                     signal_map={signal.SIGHUP: None, signal.SIGTERM: None})
        ctx.open()
    setup_logging(args.foreground, cfg.daemon.syslog)
    log.info("descriptor limit: %d", limits.raise_fd_limit(cfg.daemon.max_connections))
    if cfg.daemon.stop_grace >= TORQUE_KILL_DELAY:
        log.warning("daemon.stop_grace %.1f s is not shorter than Torque's default kill_delay (%.0f s): qdel may "
                    "SIGKILL the starter before the container is stopped", cfg.daemon.stop_grace, TORQUE_KILL_DELAY)
    if os.geteuid() == 0:
        # Every child acting as a user is the fork server's (cbatch.host.forkserver): a fork of this daemon
        # cost it more than the child's work, and the child held every fd the daemon had.
        log.info("fork server: pid %d", paths.start_forkserver())
    try:
        d = Daemon(cfg, os.path.abspath(args.config))
        d.recover()
        d.listen()
        if args.pidfile:
            write_pidfile(args.pidfile)
    except (CbatchError, OSError) as exc:
        log.error("cannot start: %s", exc)
        print(getattr(exc, "message", str(exc)), file=sys.stderr)
        return 125

    def stop(signum, _frame):
        # Leave every container running: a restarted daemon adopts them.
        log.info("signal %d: exiting (containers keep running)", signum)
        d.stopping = True
        paths = [(cfg.daemon.socket, os.unlink), (d.mount_root, os.rmdir)]
        if args.pidfile:
            paths.append((args.pidfile, os.unlink))
        for path, remove in paths:
            try:
                remove(path)      # the staging dir only when empty (else the next start-up unpins it)
            except OSError:
                pass
        os._exit(0)

    def reload(_signum, _frame):
        # Not in the handler itself: it interrupts the main thread anywhere (even inside logging's lock).
        threading.Thread(target=d.reload, name="reload", daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
