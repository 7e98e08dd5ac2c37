"""Keep an image on the node while a direct-engine container uses its layers.

Docker knows nothing of runc containers on its layers, so the direct engine holds each image the way
Docker understands: one created, never started container per (cbatchd instance, image id), labelled
``cbatch.hold=<instance>``. ``docker rmi`` refuses an image a container uses, and ``cbatch images prune``
skips it (:meth:`ImageOps.image_ids_in_use` counts every container). A holder outlives its last user (the
next job of the same image starts without a Docker call) until :meth:`Holds.drop_idle`: the router calls it
before it answers which images are in use (``cbatch images prune``), and start-up recovery sweeps the
holders of containers that are gone.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Set

LABEL_HOLD = "cbatch.hold"


class Holds:
    """Reference counts of held images, with the holder containers in the Docker engine ``docker``."""

    def __init__(self, docker, instance: str) -> None:
        self.docker = docker
        self.instance = instance
        self._users: Dict[str, Set[str]] = {}      # image id -> direct container ids using it
        self._lock = threading.Lock()

    def name(self, image_id: str) -> str:
        """The holder container's name."""
        return f"cbatch-hold-{self.instance}-{image_id.split(':')[-1][:12]}"

    def hold(self, image_id: str, user: str, volumes=()) -> None:
        """Make sure the holder exists and count ``user`` (a container id) as using ``image_id`` (whose
        VOLUME targets are ``volumes``)."""
        with self._lock:
            if image_id not in self._users:
                self._create(image_id, volumes)
                self._users[image_id] = set()
            self._users[image_id].add(user)

    def adopt(self, image_id: str, user: str) -> None:
        """After a daemon restart: count a surviving container (its holder is still there)."""
        with self._lock:
            self._users.setdefault(image_id, set()).add(user)

    def release(self, image_id: str, user: str) -> None:
        """Forget ``user`` (the holder stays until :meth:`drop_idle`)."""
        with self._lock:
            self._users.get(image_id, set()).discard(user)

    def drop_idle(self, still_used: Callable[[str], bool] = lambda _i: False) -> None:
        """Remove the holders of images no container of this instance uses."""
        with self._lock:
            for image_id in [i for i, users in self._users.items() if not users and not still_used(i)]:
                self._users.pop(image_id)
                api = self.docker.api
                self.docker._call("remove holder", image_id, api.remove_container, self.name(image_id),
                                  force=True, v=True, ok=lambda exc: getattr(exc, "status_code", None) in (404, 409))

    def _create(self, image_id: str, volumes=()) -> None:
        api = self.docker.api
        # A tmpfs on each image VOLUME: otherwise creating the holder would create anonymous volumes.
        mounts = [{"Target": v, "Type": "tmpfs", "TmpfsOptions": {"SizeBytes": 1 << 20}} for v in volumes]
        self.docker._call("hold image", image_id, api.create_container, image=image_id, name=self.name(image_id),
                          entrypoint=["/.cbatch-hold"], command=[], network_disabled=True,
                          labels={LABEL_HOLD: self.instance},
                          host_config=api.create_host_config(network_mode="none", log_config={"type": "none"},
                                                             mounts=mounts or None),
                          ok=lambda exc: getattr(exc, "status_code", None) == 409)   # already held

    def sweep(self) -> None:
        """Remove this instance's holders no container uses (start-up, after recovery adopted the rest)."""
        with self._lock:
            api = self.docker.api
            for c in self.docker._call("list holders", self.instance, api.containers, all=True,
                                       filters={"label": f"{LABEL_HOLD}={self.instance}"}) or []:
                if c.get("ImageID") not in self._users:
                    self.docker._call("remove holder", c["Id"], api.remove_container, c["Id"], force=True, v=True,
                                      ok=lambda exc: getattr(exc, "status_code", None) in (404, 409))
