"""The Docker engine: a :class:`~cbatch.core.spec.ContainerSpec` becomes a running container, reported back.

It decides nothing: every choice (image, mounts, limits, identity) arrives in the spec from the policy. Every
failure surfaces as one :class:`~cbatch.core.errors.EngineError` line. This module is the container's life
(start, wait, signal, stop, remove, cleanup by label); how a spec becomes a created, checked container (stdio
plumbing, entrypoint, identity, image paths and VOLUMEs) is :mod:`cbatch.engines.dockercreate`, exec and
images are :mod:`cbatch.engines.dockerexec` and :mod:`cbatch.engines.dockerimages`, all mixed into
:class:`Engine`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

import docker
import docker.errors
import requests.exceptions

from cbatch.core.errors import EngineError
from cbatch.core.spec import ContainerSpec
from cbatch.engines import base, dockerapi, layer
from cbatch.engines.base import ExitInfo, Stdio  # noqa: F401 - part of this engine's API
from cbatch.engines.dockercreate import CreateOps
from cbatch.engines.dockerexec import ExecOps
from cbatch.engines.dockerimages import ImageInfo, ImageOps, _gone  # noqa: F401 - ImageInfo is part of the API
from cbatch.engines.identity import helper_ids_args  # noqa: F401 - re-exported (tests, bench)
from cbatch.engines.imagecheck import shell_note  # noqa: F401 - re-exported for cbatch check

API_VERSION = "1.41"       # Debian 12's dockerd 20.10; newer engines still speak it. Pinned so that
                           # constructing an Engine never talks to the engine (no version probe).
_HINT_DOWN = "is dockerd running? see cbatch check --node"
MAX_POOL = 1024             # one pool (dockerapi): every running job holds a connection in wait()


class Engine(CreateOps, ExecOps, ImageOps):
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
    def start(self, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str) -> str:
        """Create and start the container; return its id.

        ``instance`` becomes the ``cbatch.instance`` label (which cbatchd owns it); ``helper`` is the host
        path of cbatch-exec. With ``stdio.attach`` the attach socket is opened *before* the start so no
        early byte is lost; fetch it with :meth:`attach`. A failure after create removes the container.
        """
        cid, host_config = self._create(spec, stdio, instance, helper)
        try:
            self._check_created(cid, spec, host_config)
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

    def reattach(self, cid: str, stdin: bool) -> None:
        """A new attach socket on the running ``cid`` (a session a restarted daemon takes back), for
        :meth:`attach`: the output from now on, and input only with ``stdin`` (a terminal's: Docker closed a
        non-terminal container's stdin when the old daemon's attach ended, as ``StdinOnce`` says)."""
        self._drop_attach(cid)
        self._attached[cid] = self._call("attach", cid, self.api.attach_socket, cid,
                                         params={"stdin": int(stdin), "stdout": 1, "stderr": 1, "stream": 1})

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
