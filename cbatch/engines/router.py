"""One engine object for the daemon, two implementations behind it (:mod:`cbatch.engines.base`).

``start`` picks the engine per container from the queue's ``engine`` key (``spec.engine``): ``docker``;
``direct``; ``auto`` = direct where it can run the job (overlay2 storage, network ``none``, no devices, no
terminal, runc, the shim and the seccomp profile present), else docker. Whenever a container that asked
for direct (or auto) goes to Docker the reason is logged. Every call about an existing container goes to
the engine that made it (direct ids carry :data:`cbatch.engines.direct.PREFIX`); listing and cleanup ask
both; image operations are Docker's.

A job's cleanup asks Docker only when that job may have a Docker container: until a listing of this
instance's Docker containers has come back empty (start-up recovery makes it) every cleanup asks; from then
on only the cleanup of a job that had a start routed to Docker (marked before the engine is called) does,
and asks again while Docker reports leftovers. A direct job's end is then one Docker API listing-pair less.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, List, Optional

from cbatch.core.spec import LABEL_INSTANCE, LABEL_JOB, ContainerSpec
from cbatch.engines.base import Stdio
from cbatch.engines.direct import PREFIX, DirectEngine

log = logging.getLogger("cbatchd")
_PER_CONTAINER = ("wait", "signal", "stop", "running", "status", "container_pid", "cgroup_name", "remove", "attach",
                  "reattach", "proxied", "resize", "exec_start", "exec_state", "stat")


class Router:
    """The daemon's ``engine``: ``docker`` (always) and ``direct`` (None when this daemon has none)."""

    def __init__(self, docker, direct: Optional[DirectEngine]) -> None:
        self.docker = docker
        self.direct = direct
        self._driver: Optional[str] = None
        # Which jobs may have a Docker container (module docstring): job id -> Docker starts in flight.
        self._lock = threading.Lock()
        self._docker_jobs: Dict[str, int] = {}
        self._docker_clean: Optional[str] = None    # the instance whose Docker listing came back empty
        self._unlabelled = 0                        # Docker starts without a job label (back to "unknown")

    def __getattr__(self, name: str):
        # Image operations, ping, ...: Docker's (the image manager for both engines).
        return getattr(self.docker, name)

    def _for(self, cid: str):
        if cid.startswith(PREFIX):
            if self.direct is None:
                from cbatch.core.errors import EngineError
                raise EngineError("container", "direct engine not configured", cid)
            return self.direct
        return self.docker

    def _storage_driver(self) -> str:
        if self._driver is None:
            info = self.docker._call("info", self.docker.url, self.docker.api.info)
            self._driver = str((info or {}).get("Driver") or "")
        return self._driver

    def why_not_direct(self, spec: ContainerSpec, stdio: Stdio, helper: str) -> Optional[str]:
        """Why ``spec`` cannot run on the direct engine, or None."""
        if self.direct is None:
            return "no direct engine in this daemon"
        if spec.network != "none":
            return f"network {spec.network} (direct runs network none only)"
        if spec.devices:
            return "devices requested"
        if stdio.tty:
            return "an interactive job (terminal)"
        if not spec.no_new_privileges:
            return "no_new_privileges: false (direct loads the seccomp filter as the job, which needs it)"
        missing = self.direct.unavailable(helper)
        if missing:
            return missing
        driver = self._storage_driver()
        if driver != "overlay2":
            return f"storage driver {driver or 'unknown'} (direct needs overlay2)"
        return None

    def choose(self, spec: ContainerSpec, stdio: Stdio, helper: str):
        """``(engine, name)`` for a new container, logging why a direct request went to Docker."""
        if spec.engine == "docker":
            return self.docker, "docker"
        reason = self.why_not_direct(spec, stdio, helper)
        if reason is None:
            return self.direct, "direct"
        log.log(logging.WARNING if spec.engine == "direct" else logging.INFO,
                "container %s: engine docker instead of direct: %s", spec.name, reason)
        return self.docker, "docker"

    def start(self, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str) -> str:
        """Create and start ``spec`` on the engine :meth:`choose` picks; return its id."""
        engine, _name = self.choose(spec, stdio, helper)
        if engine is not self.docker:
            return engine.start(spec, stdio, instance, helper)
        job = spec.label_dict().get(LABEL_JOB)
        with self._lock:
            if job is None:
                self._unlabelled += 1
                self._docker_clean = None
            else:
                self._docker_jobs[job] = self._docker_jobs.get(job, 0) + 1
        try:
            return engine.start(spec, stdio, instance, helper)
        finally:
            if job is not None:
                with self._lock:
                    self._docker_jobs[job] -= 1

    def _docker_may_have(self, labels: Dict[str, str]) -> bool:
        """May Docker hold a container with ``labels`` (a job's cleanup labels)? Never wrongly False."""
        job = labels.get(LABEL_JOB)
        with self._lock:
            if job is None or self._docker_clean is None or labels.get(LABEL_INSTANCE) != self._docker_clean:
                return True
            if job not in self._docker_jobs:
                return False
            if not self._docker_jobs[job]:
                # Dropped before Docker is asked: a start marking the job again afterwards is asked about
                # by the next cleanup; a start in flight keeps the entry.
                del self._docker_jobs[job]
            return True

    def _docker_has(self, labels: Dict[str, str]) -> None:
        """Docker still lists containers with ``labels`` (or could not be asked): ask again next time."""
        job = labels.get(LABEL_JOB)
        if job is not None:
            with self._lock:
                self._docker_jobs.setdefault(job, 0)

    def image_ids_in_use(self) -> set:
        """Images some container uses; idle direct-engine holders are dropped first (so prune may go on)."""
        if self.direct is not None:
            self.direct.drop_idle_holds()
        return self.docker.image_ids_in_use()

    def list_ids(self, labels: Dict[str, str]) -> List[str]:
        """Both engines' containers carrying every one of ``labels``."""
        with self._lock:
            unlabelled = self._unlabelled
        ids = list(self.docker.list_ids(labels))
        if not ids and set(labels) == {LABEL_INSTANCE}:
            with self._lock:
                if self._unlabelled == unlabelled:
                    self._docker_clean = labels[LABEL_INSTANCE]
        if self.direct is not None:
            ids += self.direct.list_ids(labels)
        return ids

    def cleanup(self, labels: Dict[str, str]) -> List[str]:
        """Remove both engines' containers with ``labels``; the ids still there."""
        left = []
        if self.direct is not None:
            from cbatch.core.errors import EngineError
            if not labels:
                raise EngineError("cleanup", "refused", "no labels", "pass at least cbatch.instance")
            unmatched: Dict[str, int] = {}       # the listing again reads only what may match
            for cid in self.direct.list_ids(labels, unmatched):
                try:
                    self.direct.remove(cid)
                except EngineError:
                    pass
            left += self.direct.list_ids(labels, unmatched)
        if not self._docker_may_have(labels):
            return left
        try:
            docker_left = self.docker.cleanup(labels)
        except BaseException:
            self._docker_has(labels)
            raise
        if docker_left:
            self._docker_has(labels)
        return docker_left + left


def _route(name: str):
    def call(self, cid, *args, **kwargs):
        return getattr(self._for(cid), name)(cid, *args, **kwargs)
    call.__name__ = name
    call.__doc__ = f"``{name}`` on the engine that made the container."
    return call


for _name in _PER_CONTAINER:
    setattr(Router, _name, _route(_name))


def bundles_dir(mount_dir: str) -> str:
    """Where the direct engine keeps its bundles: next to the daemon's mount staging directory."""
    return os.path.join(os.path.dirname(mount_dir.rstrip("/")), "direct")
