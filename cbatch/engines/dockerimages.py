"""Image operations of the Docker engine (mixed into :class:`cbatch.engines.docker.Engine`, which provides
``api`` and ``_call``): what is on this node, pull, remove, and which images running containers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import docker.errors

from cbatch.core.errors import EngineError


def _gone(exc: Exception) -> bool:
    """The container or image is not there (ImageNotFound is a NotFound)."""
    return isinstance(exc, docker.errors.NotFound)


@dataclass(frozen=True)
class ImageInfo:
    """One local image: id (``sha256:...``), repo digests, size in bytes, and its tags."""

    id: str
    digests: Tuple[str, ...]
    size: int
    tags: Tuple[str, ...] = ()
    created: str = ""          # the engine's RFC 3339 "Created" (build time); imagesync's prune age


class ImageOps:
    """Image operations of the engine."""

    @staticmethod
    def _image(attrs: dict) -> ImageInfo:
        return ImageInfo(id=attrs["Id"], digests=tuple(attrs.get("RepoDigests") or ()),
                         size=int(attrs.get("Size") or 0), tags=tuple(attrs.get("RepoTags") or ()),
                         created=str(attrs.get("Created") or ""))

    def image_info(self, ref: str) -> Optional[ImageInfo]:
        """The local image ``ref`` names, or None when it is not on this node."""
        attrs = self._call("inspect image", ref, self.api.inspect_image, ref, ok=_gone)
        return self._image(attrs) if attrs else None

    image_present = image_info     # the name docs/architecture.md used first

    def pull(self, ref: str, auth_config: Optional[dict] = None,
             progress: Optional[Callable[[dict], None]] = None) -> ImageInfo:
        """Pull ``ref`` (``name[:tag]`` or ``name@digest``); ``progress`` gets each engine event dict."""
        repo, tag = docker.utils.parse_repository_tag(ref)
        try:
            for event in self.api.pull(repo, tag=tag or "latest", stream=True, decode=True,
                                       auth_config=auth_config):
                if "error" in event:
                    raise EngineError("image", "pull failed", ref, str(event["error"]).strip())
                if progress:
                    progress(event)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "pull", ref) from exc
        info = self.image_info(ref)
        if info is None:
            raise EngineError("image", "pull failed", ref, "the engine reported success but has no image")
        return info

    def list_images(self) -> List[ImageInfo]:
        """Every local image."""
        return [self._image(self._call("inspect image", i["Id"], self.api.inspect_image, i["Id"]))
                for i in self._call("list images", None, self.api.images)]

    def image_ids_in_use(self) -> set:
        """Image ids of every container on this node, running or not (imagesync never prunes those)."""
        return {c.get("ImageID") for c in self._call("list containers", None, self.api.containers, all=True)
                if c.get("ImageID")}

    def remove_image(self, ref: str) -> bool:
        """Remove the image ``ref`` (not forced: an image in use stays). False when it was not there."""
        return bool(self._call("remove image", ref, lambda: self.api.remove_image(ref) or True, ok=_gone))


# -- attach demultiplexer ---------------------------------------------------------------------------
