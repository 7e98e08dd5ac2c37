"""The direct engine: the job's container run by runc on the image layers Docker already keeps.

Docker stays the image manager (pull, credentials, digests, ``cbatch images``); this engine only starts
containers. Per container it keeps a bundle directory ``<bundles>/<instance>/<name>`` (root-only):
``meta.json`` (labels, image, the shim's pid and start time), ``config.json`` (:mod:`cbatch.engines.ocispec`, written by :func:`cbatch.engines.bundles.write_config`),
``rootfs`` (:mod:`cbatch.engines.rootfs`), ``etc/`` and, once the container ended, ``status``.

Start: ``libexec/cbatch-shim`` (a subreaper in its own session, spawned with the job's own descriptors as
its stdio - the spool files or pipes the client passed, so no byte of output passes through cbatchd) runs
``runc run --detach`` (one runc process, run from the daemon's sealed copy of runc:
:mod:`cbatch.engines.runcbinary`) and says so on a pipe; only then does :meth:`DirectEngine.start` return, so
the pinned mounts are in the container's mount namespace. The shim waits for the container's init, records
its status and OOM-kill count and deletes it (itself where it can, else ``runc delete``). It outlives cbatchd: a restarted daemon lists bundles, waits
on the shim by pidfd and reads the same status file (recovery is the same code for both engines).

``CBATCH_TIMING=1`` logs ``timing direct.<step> <ms>`` per start step (read by the bench).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal as _signal
import subprocess
import threading
import time
from typing import Dict, List, Optional

from cbatch.core.errors import EngineError
from cbatch.core.spec import LABEL_INSTANCE, ContainerSpec
from cbatch.engines import base, bundles, imagefacts, imagehold, rootfs, runcbinary, seccomp, seccompbpf
from cbatch.engines.base import ExitInfo, Stdio
from cbatch.engines.directexec import DirectExecOps
from cbatch.host import waitfd

log = logging.getLogger("cbatchd")
PREFIX = "direct-"          # container ids of this engine (Docker's are hex): the router routes by it
RUNC = "/usr/sbin/runc"
SHIM = "cbatch-shim"        # next to the helper (daemon.helper)
STDIN_LINE_MAX = 60 * 1024  # the helper writes it into a pipe before exec: it must fit the buffer
REMOVE_WAIT = 10.0          # how long remove() waits for a killed container's shim to record it
TIMING = os.environ.get("CBATCH_TIMING") == "1"
SHIM_RUNC_FD = 5            # the shim's descriptor of the sealed runc (cbatch.engines.runcbinary), after 0-4


def _timing(step: str, since: float) -> float:
    now = time.monotonic()
    if TIMING:
        log.info("timing direct.%s %.1f", step, (now - since) * 1000)
    return now


class DirectEngine(DirectExecOps):
    """runc containers on Docker's layers; ``docker`` is the Docker :class:`~cbatch.engines.docker.Engine`
    (image inspect and holds), ``bundles`` the root-only directory of bundles, ``helper`` locates the shim."""

    def __init__(self, docker, bundles: str, instance: str, runc: str = RUNC, timeout: float = 60.0) -> None:
        self.docker = docker
        self.bundles = bundles
        self.root = os.path.join(bundles, "runc")
        self.instance = instance
        self.runc = runc
        self.sealed_runc = runcbinary.SealedRunc(runc)     # runc runs from one sealed copy (no copy per start)
        self.timeout = timeout
        self.holds = imagehold.Holds(docker, instance)
        self.facts = imagefacts.Facts(docker)
        # One start or remove at a time per container: a job's cleanup (its epilogue) racing the start of its
        # container must wait for the start and then remove what it made, not find half a bundle.
        self._locks: Dict[str, list] = {}               # cid -> [RLock, holders]
        self._locks_lock = threading.Lock()
        self._execs: Dict[str, dict] = {}                  # TM tasks (cbatch.engines.directexec)

    def _event(self, cid: str, action: str, **attrs) -> None:
        bundles.event(self.bundles, self.instance, cid, action, **attrs)

    # -- availability ---------------------------------------------------------------------------------
    def unavailable(self, helper: str) -> Optional[str]:
        """Why this node cannot run direct containers (None when it can)."""
        if not os.access(self.runc, os.X_OK):
            return f"no runc at {self.runc}"
        if not os.access(self._beside(helper, SHIM), os.X_OK):
            return f"no {self._beside(helper, SHIM)} (make -C libexec install)"
        if not seccomp.available():
            return f"no seccomp profile {seccomp.PROFILE}"
        try:
            seccompbpf.default_program()
        except EngineError as exc:
            return exc.message
        return seccompbpf.loader_problem(self._beside(helper, seccompbpf.LOADER))

    @staticmethod
    def _beside(helper: str, name: str) -> str:
        return os.path.join(os.path.dirname(helper), name)

    # -- bundles --------------------------------------------------------------------------------------
    def _dir(self, cid: str, instance: Optional[str] = None) -> str:
        name = cid[len(PREFIX):]
        if not name or "/" in name or name.startswith("."):
            raise EngineError("container", "not a direct container id", cid)
        return os.path.join(self.bundles, instance or bundles.instance_of(self.bundles, name) or self.instance, name)

    def _meta(self, cid: str) -> Optional[dict]:
        return bundles.read_json(os.path.join(self._dir(cid), "meta.json"))

    # -- start ----------------------------------------------------------------------------------------
    def start(self, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str) -> str:
        """Create and start ``spec`` with the client's own descriptors (``stdio.fds``) as its stdio."""
        t0 = time.monotonic()
        cid = PREFIX + spec.name
        with self._exclusive(cid):
            return self._start(cid, spec, stdio, instance, helper, t0)

    def _start(self, cid: str, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str, t0: float) -> str:
        t = t0
        if stdio.tty:
            raise EngineError("direct engine", "no terminal support", spec.name, "use engine: docker")
        line = spec.stdin_line.encode() if spec.stdin_line is not None else None
        if line is not None and len(line) > STDIN_LINE_MAX:
            raise EngineError("stdin line", "too long", f"{len(line)} bytes", f"at most {STDIN_LINE_MAX}")
        image_id, conf, dirs = self.facts.get(spec.image_id or spec.image)
        t = _timing("inspect", t)
        bundle = os.path.join(self.bundles, instance, spec.name)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for attempt in range(3):
            os.makedirs(os.path.dirname(bundle), mode=0o700, exist_ok=True)
            try:
                os.mkdir(bundle, 0o700)
                break
            except FileExistsError as exc:
                raise EngineError("container", "name in use", spec.name) from exc
            except FileNotFoundError:
                # Another container's removal took the (then empty) instance directory: make it again.
                if attempt == 2:
                    raise
        labels = spec.label_dict()
        labels[LABEL_INSTANCE] = instance
        cgroups_path = f"{(spec.cgroup_parent or '/cbatch').rstrip('/')}/{spec.name}"
        meta = {"cid": cid, "name": spec.name, "labels": labels, "image": spec.image, "image_id": image_id,
                "cgroup": cgroups_path, "created": time.time(), "seccomp": "loader"}
        bundles.write_json(os.path.join(bundle, "meta.json"), meta)
        try:
            self.holds.hold(image_id, cid, imagefacts.volumes(conf))
            t = _timing("hold", t)
            root = rootfs.mount(bundle, dirs, spec.layer_bytes)
            t = _timing("rootfs", t)
            cfg = bundles.write_config(bundle, spec, conf, labels.get("cbatch.peer", ""), cgroups_path,
                                      self._beside(helper, seccompbpf.LOADER), helper)
            rootfs.check_targets(root, [m["destination"] for m in cfg["mounts"]
                                        if m["type"] in ("bind", "tmpfs") and not m["destination"].startswith("/dev")])
            t = _timing("config", t)
            self._spawn(bundle, spec, stdio, helper, meta)
            _timing("runc", t)
        except BaseException:
            self.remove(cid)
            raise
        _timing("start", t0)
        return cid

    def _spawn(self, bundle: str, spec: ContainerSpec, stdio: Stdio, helper: str,
               meta: dict) -> None:
        fds = list(stdio.fds) + [None] * (3 - len(stdio.fds))
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        high: List[int] = []
        try:
            # A job's stdin is its line, which the helper feeds (as in the Docker engine); cbatch run's stdin
            # is the client's own.
            stdin = null if spec.stdin_line is not None or fds[0] is None else fds[0]
            out = fds[1] if fds[1] is not None else null
            err = fds[2] if fds[2] is not None else null
            with self.sealed_runc.use() as sealed:
                # Every source above 9 first, so no dup2 below overwrites a source it has yet to copy. The
                # sealed runc becomes the shim's fd 5 (its runc is then /proc/self/fd/5).
                sources = (stdin, out, err, ready_w, go_r) + (() if sealed is None else (sealed,))
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in sources]
            runc = self.runc if sealed is None else f"/proc/self/fd/{SHIM_RUNC_FD}"
            argv = [self._beside(helper, SHIM), bundle, runc, self.root, spec.name, meta["cgroup"]]
            actions = [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(high)]
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
        except BaseException:
            os.close(go_w)
            os.close(ready_r)
            raise
        finally:
            for fd in [null, ready_w, go_r] + high:
                os.close(fd)
        try:
            meta.update(shim=pid, shim_start=bundles.start_time(pid))
            bundles.write_json(os.path.join(bundle, "meta.json"), meta)
            # Recorded: a restarted daemon finds the shim from here on. Dying before the next line is the same
            # as after it: the shim, finding the go pipe at EOF, reads this record and starts anyway.
            os.write(go_w, b"g")
            os.close(go_w)
            go_w = -1
            # The shim is in its own session and outlives us; reap it when it ends while we still run.
            _reaper(pid)
            ready = waitfd.readable(ready_r, self.timeout)
            answer = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
            if go_w >= 0:
                os.close(go_w)
        if answer != b"s":
            status = bundles.read_status(bundle)
            why = (status or {}).get("error") or ("timed out" if not ready else "the shim ended early")
            raise EngineError("direct engine", "start failed", spec.name, why)

    # -- state ----------------------------------------------------------------------------------------
    def _shim_fd(self, meta: dict) -> Optional[int]:
        """A pidfd on the container's shim while it runs (None when it has ended)."""
        pid = meta.get("shim")
        if not pid:
            return None
        try:
            fd = os.pidfd_open(int(pid))
        except ProcessLookupError:
            return None
        if bundles.start_time(int(pid)) != meta.get("shim_start"):
            os.close(fd)
            return None
        return fd

    def _alive(self, meta: Optional[dict]) -> bool:
        fd = self._shim_fd(meta or {})
        if fd is None:
            return False
        os.close(fd)
        return True

    def status(self, cid: str) -> str:
        """``created`` (no shim was started: nothing can run), ``running`` (its shim lives: the container
        runs or is about to), ``exited`` or ``gone``."""
        meta = self._meta(cid)
        if meta is None:
            return "gone"
        if not meta.get("shim"):
            return "created"
        if bundles.read_status(self._dir(cid)) is not None or not self._alive(meta):
            return "exited"
        return "running"

    def running(self, cid: str) -> bool:
        """True while the container runs."""
        return self.status(cid) == "running"

    def container_pid(self, cid: str) -> int:
        """The host pid of the container's init (0 when not running)."""
        if not self.running(cid):
            return 0
        try:
            with open(os.path.join(self._dir(cid), "pid")) as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def cgroup_name(self, cid: str) -> str:
        """What the container's own cgroup path names it by (``cgroupsPath`` ends in its name)."""
        return cid[len(PREFIX):]

    def proxied(self, cid: str) -> bool:  # noqa: ARG002 - the interface (cbatch.engines.base)
        """Never: the container process has the client's own descriptors."""
        return False

    def attach(self, cid: str):
        """The direct engine has no attach stream (the job has its descriptors itself)."""
        raise EngineError("container", "not attached", cid, "the direct engine passes descriptors")

    def reattach(self, cid: str, stdin: bool):  # noqa: ARG002 - the interface (cbatch.engines.base)
        """Nothing to take back: the container still has the client's descriptors."""
        return self.attach(cid)

    # -- wait, signal, remove -------------------------------------------------------------------------
    def wait(self, cid: str) -> ExitInfo:
        """Block until the container has ended (its shim exits after recording the status)."""
        meta = self._meta(cid)
        if meta is None:
            raise EngineError("container", "not found", cid)
        bundle = self._dir(cid)
        fd = self._shim_fd(meta)
        if fd is not None:
            try:
                waitfd.readable(fd)
            finally:
                os.close(fd)
        status = bundles.read_status(bundle)
        if status is None:
            if not os.path.isdir(bundle):
                raise EngineError("container", "not found", cid)
            self._kill_all(meta)        # the shim was killed: the container must not run on unwatched
            return ExitInfo(status=137, error="the container's shim ended without a status")
        self._event(cid, "die", exitCode=str(status["status"]), deleted=status.get("deleted", ""))
        notice = None
        if rootfs.full(bundle):
            notice = EngineError("container", "writable layer full", f"{rootfs.layer_mib(bundle)} MiB",
                                 "writes into the image's filesystem are bounded by hardening.layer_size; put big"
                                 " files in $TMPDIR, the working directory or a mounted directory").message
        cpu_us = status.get("cpu_us")
        return ExitInfo(status=status["status"], oom_killed=status.get("oom", 0) > 0, error=status.get("error"),
                        notice=notice, cpu_s=None if cpu_us is None else round(cpu_us / 1e6, 3),
                        peak_bytes=status.get("peak_bytes"))

    def _runc(self, *args: str) -> subprocess.CompletedProcess:
        with self.sealed_runc.executable() as runc:
            return subprocess.run(["runc", "--root", self.root, *args], executable=runc, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=self.timeout)

    def signal(self, cid: str, signum: int) -> None:
        """``signum`` to the container's init (tini forwards it to the job's process group); a stopped or
        vanished container is not an error."""
        meta = self._meta(cid)
        if meta is None or not self._alive(meta):
            return
        self._event(cid, "kill", signal=str(int(signum)))
        self._runc("kill", meta["name"], str(int(signum)))

    def stop(self, cid: str, grace: float) -> None:
        """SIGTERM, then SIGKILL when still running after ``grace`` seconds."""
        base.stop(self, cid, grace)

    def _kill_all(self, meta: dict) -> None:
        self._runc("kill", "--all", meta["name"], "KILL")
        self._runc("delete", "--force", meta["name"])

    def remove(self, cid: str) -> None:
        """Kill the container, wait for its shim, delete it, unmount, release the image (idempotent; a
        second caller waits for the first, so "removed" means gone for both)."""
        with self._exclusive(cid):
            self._remove(cid)

    @contextlib.contextmanager
    def _exclusive(self, cid: str):
        """Hold ``cid``'s lock (re-entrant: a failed start removes what it made under the same hold)."""
        with self._locks_lock:
            entry = self._locks.setdefault(cid, [threading.RLock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._locks.pop(cid, None)

    def _remove(self, cid: str) -> None:
        bundle = self._dir(cid)
        if not os.path.isdir(bundle):
            return
        meta = self._meta(cid) or {"name": cid[len(PREFIX):]}
        fd = self._shim_fd(meta)
        if fd is not None:
            try:
                self._runc("kill", "--all", meta["name"], "KILL")
                if not waitfd.readable(fd, REMOVE_WAIT):
                    os.kill(int(meta["shim"]), _signal.SIGKILL)
            finally:
                os.close(fd)
        # runc keeps a container's state in <root>/<id>: once the shim's own delete removed it there is
        # nothing left to delete (one runc process less at every job's end).
        if os.path.lexists(os.path.join(self.root, meta["name"])):
            self._runc("delete", "--force", meta["name"])
        rootfs.release(bundle)
        if any(os.path.ismount(os.path.join(bundle, n)) for n in ("rootfs", "layer")):
            raise EngineError("container", "remove failed", cid, "its root filesystem is still mounted")
        shutil.rmtree(bundle, ignore_errors=True)
        bundles.drop_instance_dir(self.bundles, os.path.basename(os.path.dirname(bundle)))
        self._event(cid, "destroy")
        if meta.get("image_id"):
            self.holds.release(meta["image_id"], cid)

    def drop_idle_holds(self) -> None:
        """Let Docker remove images no direct container of this instance uses any more."""
        used = {meta.get("image_id") for meta in bundles.instance_metas(self.bundles, self.instance).values()}
        self.holds.drop_idle(lambda image_id: image_id in used)

    def list_ids(self, labels: Dict[str, str], unmatched: Optional[Dict[str, int]] = None) -> List[str]:
        """Ids of this node's direct containers carrying every one of ``labels`` (bundles on disk);
        ``unmatched``: one cleanup's memo of bundles already read and not matching (:func:`bundles.scan`)."""
        return [PREFIX + n for n in bundles.scan(self.bundles, labels, bundles.read_json, unmatched)]

    def adopt(self) -> None:
        """After a restart: count the surviving containers' images as held, drop unused holders."""
        for name, meta in bundles.instance_metas(self.bundles, self.instance).items():
            if meta.get("image_id"):
                self.holds.adopt(meta["image_id"], PREFIX + name)
        self.holds.sweep()
        bundles.sweep(self.bundles, self.instance)


def _reaper(pid: int) -> None:
    """Reap the shim (our child until we restart) in a thread, so it never stays a zombie."""
    threading.Thread(target=os.waitpid, args=(pid, 0), name=f"reap-{pid}", daemon=True).start()
