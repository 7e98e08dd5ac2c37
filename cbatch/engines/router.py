"""One engine object for the daemon, two implementations behind it (:mod:`cbatch.engines.base`).

``start`` picks the engine per container from the queue's ``engine`` key (``spec.engine``): ``docker``;
``direct``; ``auto`` = direct where it can run the job (overlay2 storage, network ``none``, no devices, no
terminal, runc, the shim and the seccomp profile present), else docker. Whenever a container that asked
for direct (or auto) goes to Docker the reason is logged. Every call about an existing container goes to
the engine that made it (direct ids carry :data:`cbatch.engines.direct.PREFIX`); listing and cleanup ask
both; image operations are Docker's.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

from cbatch.core.spec import ContainerSpec
from cbatch.engines.base import Stdio
from cbatch.engines.direct import PREFIX, DirectEngine

log = logging.getLogger("cbatchd")
_PER_CONTAINER = ("wait", "signal", "stop", "running", "status", "container_pid", "cgroup_name", "remove", "attach",
                  "proxied", "resize", "exec_start", "exec_state", "stat")


class Router:
    """The daemon's ``engine``: ``docker`` (always) and ``direct`` (None when this daemon has none)."""

    def __init__(self, docker, direct: Optional[DirectEngine]) -> None:
        self.docker = docker
        self.direct = direct
        self._driver: Optional[str] = None

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
        return engine.start(spec, stdio, instance, helper)

    def image_ids_in_use(self) -> set:
        """Images some container uses; idle direct-engine holders are dropped first (so prune may go on)."""
        if self.direct is not None:
            self.direct.drop_idle_holds()
        return self.docker.image_ids_in_use()

    def list_ids(self, labels: Dict[str, str]) -> List[str]:
        """Both engines' containers carrying every one of ``labels``."""
        ids = list(self.docker.list_ids(labels))
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
            for cid in self.direct.list_ids(labels):
                try:
                    self.direct.remove(cid)
                except EngineError:
                    pass
            left += self.direct.list_ids(labels)
        return self.docker.cleanup(labels) + left


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
