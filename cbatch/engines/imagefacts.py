"""What the direct engine needs of an image (its id, config and overlay2 layer directories), cached by image
ID so a start costs no ``docker image inspect``.

An image ID is the digest of the image's config: the config and the layers it names never change, so an
entry keyed by ID is never stale in content. Only two things can change under it: the image is removed
(its layer directories go; every hit checks they are still there, and a miss is inspected again: a removed
and re-pulled image has new overlay2 directories), and a NAME moves to another image (a re-tag). Names are
therefore never cached: the daemon resolves the job's reference once (``images.ensure``, which the policy's
decision and the job's ``CBATCH_IMAGE_ID`` rest on) and passes that ID in ``ContainerSpec.image_id``; the
engine starts exactly that image. A bare name (no id given) is inspected every time.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import List, Tuple

from cbatch.engines import rootfs

MAX_ENTRIES = 64        # distinct images a node runs at once is small; the cache stays bounded anyway


def volumes(conf: dict) -> List[str]:
    """The image's VOLUME targets, normalized and sorted (the holder covers each with a tmpfs)."""
    return [os.path.normpath("/" + str(v).lstrip("/")) for v in sorted(conf.get("Volumes") or {})]


def _is_id(ref: str) -> bool:
    return ref.startswith("sha256:") and len(ref) == 71


class Facts:
    """``get(ref) -> (image_id, config, layer_dirs)``; entries keyed by image ID, least recently used
    dropped beyond :data:`MAX_ENTRIES`. ``docker``: the Docker engine (its ``_call`` and ``api``)."""

    def __init__(self, docker) -> None:
        self.docker = docker
        self._by_id: "OrderedDict[str, Tuple[dict, List[str]]]" = OrderedDict()
        self._lock = threading.Lock()
        self.inspections = 0            # how many times the engine was asked (tests and the bench read it)

    def get(self, ref: str) -> Tuple[str, dict, List[str]]:
        """The image ``ref`` (an image ID, or a name inspected now), its config and its layer dirs, top
        first; EngineError when it is not there or its layers are missing."""
        if _is_id(ref):
            with self._lock:
                hit = self._by_id.get(ref)
                if hit is not None:
                    self._by_id.move_to_end(ref)
            if hit is not None and all(os.path.isdir(d) for d in hit[1]):
                return ref, hit[0], list(hit[1])
        attrs = self.docker._call("inspect image", ref, self.docker.api.inspect_image, ref)
        self.inspections += 1
        image_id, conf = attrs["Id"], attrs.get("Config") or {}
        dirs = rootfs.lower_dirs(attrs)             # checks the directories exist
        with self._lock:
            self._by_id[image_id] = (conf, list(dirs))
            self._by_id.move_to_end(image_id)
            while len(self._by_id) > MAX_ENTRIES:
                self._by_id.popitem(last=False)
        return image_id, conf, dirs
