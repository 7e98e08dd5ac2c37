"""The container engine: the ONLY module that imports ``docker``.

It turns a :class:`~cbatch.core.spec.ContainerSpec` into a running container and reports back. It decides
nothing: every choice (image, mounts, limits, identity) arrives in the spec from the policy. Every failure
surfaces as one :class:`~cbatch.core.errors.EngineError` line.

Stdio. The job's output is the hot path, so it never passes through Python when it can avoid it: a regular
stdout/stderr file is bind-mounted at ``/.cbatch/stdout``/``/.cbatch/stderr`` and the static helper
``cbatch-exec`` (bind-mounted read-only at ``/.cbatch/exec``) opens it O_APPEND and dup2s it onto fd 1/2
before it execs the command. Only when the caller asks for ``attach`` (a terminal, a pipe) do the bytes go
through the engine's attach socket, demultiplexed by :func:`cbatch.daemon.streams.pump`. Docker's own log is
switched off (``log_config: none``) so output is never stored twice.

Entrypoint. The helper is always the container's entrypoint, so the stdio plumbing is the same for every
job. With ``spec.use_entrypoint`` the image's own Entrypoint (and its Cmd when ``spec.argv`` is empty) is
read from the image and placed after the helper's ``--``: the image's entrypoint still runs, as the job's
process, with the job's stdio — exactly ``docker run IMAGE ARGV`` semantics, plus cbatch's plumbing.

Identity. Nothing in the image may resolve an id: Docker and runc read the image's /etc/passwd and
/etc/group for ``user`` and ``group_add`` (a group_add entry is matched as a NAME first, so an image group
named ``1003`` with gid 0 becomes the job's). A job of a non-root user therefore starts as numeric ``0:0``
with every capability dropped but SETUID/SETGID/SETPCAP, no group_add, and the helper, as PID 1, sets the
host's exact numbers itself (``--ids``, :func:`helper_ids_args`) before it opens anything. Only then does
it exec the init (the engine's tini, bind-mounted at /.cbatch/init instead of Docker's ``--init``, so that no
process in the container ever runs as root), which starts the helper again for the stdio plumbing:
``exec --ids U:G:GS -- init -- exec --stdout ... -- CMD``.

Image paths. Mount targets are checked in the created container, before it starts, through the engine's
archive stat: a target whose path passes through a symlink in the image is refused (results cached per
image id). The image's VOLUMEs are each covered with a bounded tmpfs so no anonymous volume is created.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import docker
import docker.errors
import requests.exceptions

from cbatch.core.errors import EngineError
from cbatch.core.spec import HELPER_PATH, INIT_PATH, LABEL_INSTANCE, STDERR_PATH, STDOUT_PATH, ContainerSpec
from cbatch.engines import base, dockerapi, imagecheck, layer
from cbatch.engines.base import ExitInfo, Stdio  # noqa: F401 - part of this engine's API
from cbatch.engines.dockerexec import ExecOps
from cbatch.engines.dockerimages import ImageInfo, ImageOps, _gone  # noqa: F401 - ImageInfo is part of the API
from cbatch.engines.identity import (helper_argv, IDS_CAPS, UNPRIV_PORT_SYSCTL, helper_ids_args,
                                     host_unprivileged_port_start, init_binary)
from cbatch.engines.imagecheck import shell_note  # noqa: F401 - re-exported for cbatch check

API_VERSION = "1.41"       # Debian 12's dockerd 20.10; newer engines still speak it. Pinned so that
                           # constructing an Engine never talks to the engine (no version probe).
_HINT_DOWN = "is dockerd running? see cbatch check --node"
STDIN_LINE_MAX = 60 * 1024  # cbatch-exec writes the line into a pipe before exec: it must fit the buffer
VOLUME_TMPFS_BYTES = 64 * 1024 * 1024   # each image VOLUME becomes a tmpfs of at most this
MAX_POOL = 1024             # one pool (dockerapi): every running job holds a connection in wait()


class Engine(ExecOps, ImageOps):
    """A connection to one Docker engine. Cheap to build: nothing is sent until the first call."""

    def __init__(self, url: str = "unix:///var/run/docker.sock", timeout: float = 60):
        self.url = url
        self.timeout = timeout
        try:
            self.api = dockerapi.client(url, API_VERSION, timeout, max_pool_size=MAX_POOL)
        except docker.errors.DockerException as exc:
            raise EngineError("engine", "bad url", url, str(exc)) from exc
        self._attached: Dict[str, object] = {}   # cid -> the SDK's socket object (keeps it alive)
        self._links: Dict[Tuple[str, str], str] = {}   # (image id, path) -> "" | link target | "absent"

    # -- errors -------------------------------------------------------------------------------------
    def _fail(self, exc: Exception, what: str, value: object = None) -> EngineError:
        """Map an SDK / transport exception to one EngineError line."""
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, (requests.exceptions.ConnectionError, FileNotFoundError, ConnectionError)):
            return EngineError("engine", "not reachable", self.url, _HINT_DOWN)
        if isinstance(exc, requests.exceptions.Timeout):
            return EngineError("engine", "timed out", f"{what} after {self.timeout} s", _HINT_DOWN)
        if isinstance(exc, docker.errors.ImageNotFound):
            return EngineError("image", "not on this node", value,
                               "ask the admin to pull it, or see cbatch images")
        if isinstance(exc, docker.errors.NotFound):
            return EngineError("container", "not found", value)
        if isinstance(exc, docker.errors.APIError):
            detail = exc.explanation or str(exc)
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            return EngineError("engine", f"{what} failed", value, str(detail).strip())
        return EngineError("engine", f"{what} failed", value, f"{type(exc).__name__}: {exc}")

    def _call(self, what: str, value: object, fn: Callable, *args,
              ok: Callable[[Exception], bool] = lambda exc: False, **kwargs):
        """``fn(*args, **kwargs)``; an exception ``ok`` accepts gives None, any other an EngineError."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - everything becomes one EngineError line
            if ok(exc):
                return None
            raise self._fail(exc, what, value) from exc

    # -- engine -------------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the engine answers; EngineError otherwise."""
        return bool(self._call("ping", self.url, self.api.ping))

    # -- containers ---------------------------------------------------------------------------------
    def _command(self, spec: ContainerSpec, stdio: Stdio, conf: Optional[dict] = None) -> List[str]:
        """The container's full command: the helper, its options, ``--``, then what it execs."""
        argv = list(spec.argv)
        if spec.use_entrypoint:
            if conf is None:
                conf = (self._call("inspect image", spec.image, self.api.inspect_image, spec.image)
                        .get("Config") or {})
            argv = list(conf.get("Entrypoint") or []) + (argv or list(conf.get("Cmd") or []))
        if not argv:
            raise EngineError("container", "no command", spec.image,
                              "the spec has no argv and the image no entrypoint or cmd")
        opts: List[str] = []
        if stdio.stdout_path:
            opts += ["--stdout", STDOUT_PATH]
        if stdio.stderr_path:
            opts += ["--stderr", STDERR_PATH]
        if spec.umask is not None:
            opts += ["--umask", "%04o" % spec.umask]
        if spec.stdin_line is not None:
            if len(spec.stdin_line.encode()) > STDIN_LINE_MAX:   # the helper would refuse it in the .e file
                raise EngineError("stdin line", "too long", f"{len(spec.stdin_line.encode())} bytes",
                                  f"at most {STDIN_LINE_MAX}")
            opts += ["--stdin-line", spec.stdin_line]
        command = helper_argv(opts, argv, spec.name)
        if spec.init:
            # tini then signals the job's whole process group (TINI_KILL_PROCESS_GROUP), as pbs_mom does.
            command = [INIT_PATH, "--"] + command
        if spec.uid != 0:
            # PID 1 is the helper, as root: it becomes the job's ids, then execs the init (or the job).
            command = [HELPER_PATH] + helper_ids_args(spec.uid, spec.gid, spec.groups) + ["--"] + command
        return command

    @staticmethod
    def _mounts(spec: ContainerSpec, stdio: Stdio, helper: str, conf: Optional[dict] = None) -> list:
        """Every mount of the container: the spec's binds, cbatch's plumbing, a tmpfs per image VOLUME."""
        bind = docker.types.Mount
        mounts = [bind(m.target, m.source, type="bind", read_only=m.read_only, propagation="rprivate")
                  for m in spec.mounts]
        mounts.append(bind(HELPER_PATH, helper, type="bind", read_only=True, propagation="rprivate"))
        if spec.init:
            mounts.append(bind(INIT_PATH, init_binary(), type="bind", read_only=True, propagation="rprivate"))
        for path, target in ((stdio.stdout_path, STDOUT_PATH), (stdio.stderr_path, STDERR_PATH)):
            if path:
                mounts.append(bind(target, path, type="bind", read_only=False, propagation="rprivate"))
        # An image VOLUME would be an anonymous volume: unbounded disk, on a path nobody checked. A
        # bounded tmpfs at the same target takes its place (the engine skips a VOLUME already mounted).
        taken = {m["Target"] for m in mounts}
        for vol in sorted((conf or {}).get("Volumes") or {}):
            target = os.path.normpath("/" + str(vol).lstrip("/"))
            inside = [t for t in taken if target.startswith(t.rstrip("/") + "/")]
            if inside and target not in taken:
                # Its mount point would be created by the engine, as root, inside a host directory.
                raise EngineError("image", "VOLUME inside a mounted host directory", target,
                                  f"{sorted(inside)[-1]} is mounted from the host; use an image without it")
            if target not in taken:
                mounts.append(bind(target, None, type="tmpfs", tmpfs_size=VOLUME_TMPFS_BYTES,
                                   tmpfs_mode=0o1777))
                taken.add(target)
        return mounts

    def _host_config(self, spec: ContainerSpec, stdio: Stdio, helper: str, conf: Optional[dict] = None) -> dict:
        drop_ids = spec.uid != 0
        caps = None
        if spec.cap_drop_all and drop_ids:
            caps = IDS_CAPS
        kw = dict(
            mounts=self._mounts(spec, stdio, helper, conf),
            network_mode=spec.network,
            read_only=spec.read_only_rootfs,
            # Never for a non-root job: the engine would resolve each entry in the image's /etc/group.
            group_add=None if drop_ids else ([str(g) for g in spec.groups] or None),
            cgroup_parent=spec.cgroup_parent or None,
            pids_limit=spec.pids_limit,
            cap_drop=["ALL"] if spec.cap_drop_all else None,
            cap_add=caps,
            security_opt=["no-new-privileges"] if spec.no_new_privileges else None,
            init=False,       # cbatch's own /.cbatch/init, started after the drop (see the module doc)
            shm_size=spec.shm_bytes,
            devices=list(spec.devices) or None,
            # No Docker log: output goes to the job's files (or the attach socket), never stored twice.
            log_config=docker.types.LogConfig(type="none"),
        )
        if spec.network != "host":
            # Docker opens every port to everyone in the container's net namespace (start = 0); batch
            # daemons trust ports < 1024, so the job keeps the host's rule.
            kw["sysctls"] = {UNPRIV_PORT_SYSCTL: str(host_unprivileged_port_start())}
        if spec.cpus:
            kw["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.cpuset:
            kw["cpuset_cpus"] = spec.cpuset
        if spec.memory_bytes:
            # memswap == memory: no swap, so a job over its limit is OOM-killed rather than swapping.
            kw["mem_limit"] = spec.memory_bytes
            kw["memswap_limit"] = spec.memory_bytes
        return self.api.create_host_config(**{k: v for k, v in kw.items() if v is not None})

    def start(self, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str) -> str:
        """Create and start the container; return its id.

        ``instance`` becomes the ``cbatch.instance`` label (which cbatchd owns it); ``helper`` is the host
        path of cbatch-exec. With ``stdio.attach`` the attach socket is opened *before* the start so no
        early byte is lost; fetch it with :meth:`attach`. A failure after create removes the container.
        """
        for path in (stdio.stdout_path, stdio.stderr_path):
            # A bind of a missing source would make Docker create a directory there; refuse instead.
            if path and not os.path.isfile(path):
                raise EngineError("output", "not a regular file", path)
        if not os.path.isfile(helper):
            raise EngineError("helper", "not found", helper, "make -C libexec install")
        labels = spec.label_dict()
        labels[LABEL_INSTANCE] = instance
        env = [f"{k}={v}" for k, v in spec.env_dict().items()]
        # tini (/.cbatch/init) then signals the job's whole process group, as pbs_mom signals the session.
        env.append("TINI_KILL_PROCESS_GROUP=1")
        image = self._call("inspect image", spec.image, self.api.inspect_image, spec.image)
        conf = image.get("Config") or {}
        # Numeric 0:0 so the engine resolves no name; the helper becomes the job's ids (--ids).
        user = "0:0" if spec.uid != 0 else f"{spec.uid}:{spec.gid}"
        host_config = self._host_config(spec, stdio, helper, conf)
        config = dict(
            image=spec.image, name=spec.name, entrypoint=self._command(spec, stdio, conf), command=None,
            user=user, working_dir=spec.workdir, environment=env, labels=labels,
            hostname=spec.hostname, host_config=host_config,
            # stdin_open with detach=False also sets StdinOnce: our stdin EOF closes the container's stdin.
            stdin_open=stdio.attach, tty=stdio.attach and stdio.tty, detach=not stdio.attach,
            use_config_proxy=False,     # the job's environment is the spec's, not ~/.docker/config.json's
        )
        try:
            cid = self.api.create_container(**config)["Id"]
        except docker.errors.ImageNotFound as exc:
            raise self._fail(exc, "create container", spec.image) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "create container", spec.name) from exc
        try:
            attrs = self._call("inspect", cid, self.api.inspect_container, cid)
            if spec.layer_bytes:
                self._bound_layer(attrs, spec.layer_bytes)
            # The image the container really has (a tag may have moved since the inspect above).
            self.check_targets(cid, attrs["Image"], [m["Target"] for m in host_config.get("Mounts") or []])
            if stdio.attach:
                self._attached[cid] = self.api.attach_socket(
                    cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            self.api.start(cid)
        except Exception as exc:  # noqa: BLE001
            err = self._fail(exc, "start container", spec.name)
            if err.problem in ("not reachable", "timed out") and self._ran_after_all(cid):
                # The engine went away while answering the start: the container runs (or ran) the job's
                # code, so it is the job's; supervision waits for the engine (no 125, no orphan).
                return cid
            try:
                self.remove(cid)
            except Exception:  # noqa: BLE001 - the start error is the one to report
                pass
            raise err from exc
        return cid

    def _ran_after_all(self, cid: str) -> bool:
        """After a start whose answer was lost: wait (up to the engine timeout) for the engine to answer,
        and say whether the container left the ``created`` state (it ran user code)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                state = (self.api.inspect_container(cid).get("State") or {}).get("Status")
                return bool(state) and state != "created"
            except docker.errors.NotFound:
                return False
            except Exception:  # noqa: BLE001 - still unreachable: keep asking until the deadline
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.5)

    @staticmethod
    def _bound_layer(attrs: dict, size: int) -> None:
        """Put the container's writable layer on a tmpfs of ``size`` bytes (see :mod:`cbatch.engines.layer`)."""
        ldir = layer.layer_dir(attrs)
        if ldir is None or not os.path.isdir(ldir):
            # Fail closed: a queue that asked for a bound never runs unbounded.
            raise EngineError("hardening", "cannot bound the writable layer",
                              (attrs.get("GraphDriver") or {}).get("Name"),
                              "needs a local overlay2 engine; or set hardening.layer_size: null")
        layer.bound(ldir, size)

    @staticmethod
    def _layer_notice(attrs: dict) -> Optional[str]:
        ldir = layer.layer_dir(attrs)
        if not ldir or not layer.full(ldir):
            return None
        st = os.statvfs(ldir)
        return EngineError("container", "writable layer full", f"{st.f_blocks * st.f_frsize // 2 ** 20} MiB",
                           "writes into the image's filesystem are bounded by hardening.layer_size; put big"
                           " files in $TMPDIR, the working directory or a mounted directory").message

    def _release_layer(self, cid: str) -> None:
        """Unmount the layer's tmpfs (after the container stopped); the engine cannot remove it otherwise."""
        attrs = self._call("inspect", cid, self.api.inspect_container, cid, ok=_gone)
        ldir = layer.layer_dir(attrs or {})
        if not ldir or not layer.mounted(ldir):
            return
        if (attrs.get("State") or {}).get("Running"):
            self._call("kill", cid, self.api.kill, cid, ok=lambda exc: _gone(exc)
                       or getattr(exc, "status_code", None) == 409)
            self._call("wait", cid, self.api.wait, cid, timeout=30,
                       ok=lambda exc: _gone(exc) or isinstance(exc, requests.exceptions.RequestException))
        layer.release(ldir)

    def stat(self, cid: str, path: str) -> Optional[dict]:
        """The engine's stat of ``path`` in container ``cid`` (last component not followed), None if absent."""
        return imagecheck.stat(self, cid, path)

    def check_targets(self, cid: str, image_id: str, targets: Sequence[str]) -> None:
        """Refuse any mount target passing through a symlink in the image (:func:`imagecheck.check_targets`)."""
        imagecheck.check_targets(self, cid, image_id, targets, self._links)

    def attach(self, cid: str) -> socket.socket:
        """The attach socket opened by :meth:`start` (``stdio.attach``): pass it to :func:`cbatch.daemon.streams.pump`."""
        sio = self._attached.get(cid)
        if sio is None:
            raise EngineError("container", "not attached", cid, "start it with Stdio(attach=True)")
        sock = getattr(sio, "_sock", sio)
        sock.settimeout(None)
        return sock

    def proxied(self, cid: str) -> bool:  # noqa: ARG002 - the interface (cbatch.engines.base)
        """Docker hands stdio that is not a bind-mounted file to the daemon's proxy (its attach stream)."""
        return True

    def _drop_attach(self, cid: str) -> None:
        sio = self._attached.pop(cid, None)
        if sio is not None:
            sock = getattr(sio, "_sock", None)
            for obj in (sio, sock):
                try:
                    if obj is not None:
                        obj.close()
                except OSError:
                    pass

    def wait(self, cid: str) -> ExitInfo:
        """Block until the container has stopped (no timeout: jobs run for days)."""
        res = self._call("wait", cid, self.api.wait, cid, timeout=None)
        # Removed right after it stopped (a cleanup): the status alone is enough.
        attrs = self._call("inspect", cid, self.api.inspect_container, cid, ok=_gone) or {}
        state = attrs.get("State") or {}
        err = (res.get("Error") or {}).get("Message") or state.get("Error") or None
        return ExitInfo(status=int(res.get("StatusCode", state.get("ExitCode", 125))),
                        oom_killed=bool(state.get("OOMKilled")), error=err, notice=self._layer_notice(attrs))

    def signal(self, cid: str, signum: int) -> None:
        """Send ``signum`` to the container's init (tini forwards it to the job's process group).

        A container that has already stopped (409) or vanished is not an error: the race with the job's
        own exit is normal.
        """
        self._call("signal", cid, self.api.kill, cid, signal=int(signum),
                   ok=lambda exc: _gone(exc) or getattr(exc, "status_code", None) == 409)

    def running(self, cid: str) -> bool:
        """True while the container runs; False when stopped or gone."""
        attrs = self._call("inspect", cid, self.api.inspect_container, cid, ok=_gone)
        return bool(attrs and attrs["State"]["Running"])

    def stop(self, cid: str, grace: float) -> None:
        """SIGTERM, then SIGKILL when still running after ``grace`` seconds (a float, unlike docker stop)."""
        base.stop(self, cid, grace)

    def remove(self, cid: str) -> None:
        """Kill and remove the container; a container already gone (or being removed) is fine."""
        self._drop_attach(cid)
        self._release_layer(cid)
        self._call("remove container", cid, self.api.remove_container, cid, force=True, v=True,
                   ok=lambda exc: _gone(exc) or (getattr(exc, "status_code", None) == 409
                                                 and "already in progress" in str(exc.explanation)))

    def list_ids(self, labels: Dict[str, str]) -> List[str]:
        """Ids of all containers (running or not) carrying every one of ``labels``."""
        flt = {"label": [f"{k}={v}" for k, v in sorted(labels.items())]}
        return [c["Id"] for c in self._call("list containers", flt, self.api.containers, all=True,
                                            filters=flt)]

    def cleanup(self, labels: Dict[str, str]) -> List[str]:
        """Remove every container with ``labels``, list again, and return the ids still there."""
        if not labels:
            # An empty filter matches every container on the node, including other people's.
            raise EngineError("cleanup", "refused", "no labels", "pass at least cbatch.instance")
        for cid in self.list_ids(labels):
            try:
                self.remove(cid)
            except EngineError:
                pass  # reported below as a leftover
        return self.list_ids(labels)
