"""What the engine may not take from an image: mount targets through its symlinks; its missing shell.

The engine resolves a mount target's symlinks inside the image before it mounts, so ``/x/passwd`` with
``/x -> /etc`` would land on /etc/passwd. :func:`check_targets` stats every component of every target in the
created, not yet started container through the engine's archive stat API (answers cached per image id) and
refuses any symlink. :func:`shell_note` is the one line ``cbatch check`` prints when a login shell is missing.
``engine`` is a :class:`cbatch.engines.docker.Engine`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import docker.errors
from docker.utils import decode_json_header

from cbatch.core.errors import EngineError
from cbatch.core.spec import LABEL_INSTANCE

GO_MODE_SYMLINK = 1 << 27   # os.ModeSymlink in the engine's path stat
LINK_CACHE_MAX = 20000


def _prefixes(target: str) -> List[str]:
    parts = [p for p in target.split("/") if p]
    return ["/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _under(path: str, top: str) -> bool:
    return path != top and path.startswith(top.rstrip("/") + "/")


def stat(engine, cid: str, path: str) -> Optional[dict]:
    """The engine's stat of ``path`` in container ``cid`` (last component not followed), None if absent."""
    api = engine.api

    def head():
        res = api.head(api._url("/containers/{0}/archive", cid), params={"path": path})
        if res.status_code == 404:
            return None
        api._raise_for_status(res)
        raw = res.headers.get("x-docker-container-path-stat")
        if not raw:
            raise EngineError("engine", "stat failed", path, "no path stat in the answer")
        return decode_json_header(raw)
    return engine._call("stat path", path, head)


def check_targets(engine, cid: str, image_id: str, targets: Sequence[str],
                  cache: Dict[Tuple[str, str], str]) -> None:
    """Refuse (EngineError) any mount target that passes through a symlink in the image.

    The engine resolves a target's symlinks inside the image before it mounts, so ``/x/passwd`` with
    ``/x -> /etc`` would land on /etc/passwd. Every component is stat'ed in the created, not yet started
    container, except those strictly under another mount target (host content, not the image's).
    Answers depend only on the image, so they are cached per image id in ``cache`` (the engine's).
    """
    if len(cache) > LINK_CACHE_MAX:
        cache.clear()
    tops = set(targets)
    for target in sorted(tops):
        for prefix in _prefixes(target):
            if any(_under(prefix, t) for t in tops):
                break
            key = (image_id, prefix)
            if key not in cache:
                st = stat(engine, cid, prefix)
                cache[key] = ("absent" if st is None else
                              str(st.get("linkTarget") or "?") if int(st.get("mode", 0)) & GO_MODE_SYMLINK
                              else "")
            found = cache[key]
            if found == "absent":
                break
            if found:
                raise EngineError("mount", "target passes through a symlink in the image",
                                  f"{target} ({prefix} -> {found})",
                                  "the image's symlinks are not followed for mounts; choose another target"
                                  " or an image without that link")


def shell_note(engine, image: str, shell: str) -> Optional[str]:
    """One line for ``cbatch check`` when ``shell`` (a user's login shell) is not in ``image``, else None.

    The helper then runs the job's line with the image's /bin/sh (same words, same ``$0``); without a
    /bin/sh either, only a script whose ``#!`` interpreter is in the image can run. Creates (never starts)
    a throw-away container to stat the paths, and removes it.
    """
    cid = engine._call("create container", image, engine.api.create_container, image=image,
                       entrypoint=["/.cbatch/none"], command=None, network_disabled=True,
                       labels={LABEL_INSTANCE: "cbatch-check"})["Id"]
    try:
        if stat(engine, cid, shell) is not None:
            return None
        if stat(engine, cid, "/bin/sh") is not None:
            return str(EngineError("image", "login shell not in the image", shell,
                                   f"jobs of this user run their line with the image's /bin/sh in {image}"))
        return str(EngineError("image", "login shell not in the image, and no /bin/sh either", shell,
                               f"only scripts whose #! interpreter is in {image} can run"))
    finally:
        engine._call("remove container", cid, engine.api.remove_container, cid, force=True,
                     ok=lambda exc: isinstance(exc, docker.errors.NotFound))
