"""The direct engine's root filesystem: an overlay of the image's own overlay2 layers (read-only lower
directories, exactly as ``docker image inspect`` reports them) plus a per-container upper/work directory
owned by cbatchd, on a tmpfs of ``layer_bytes`` when the queue bounds the writable layer.

Docker's layers are never written: they are overlay lower directories. The image stays on the node while
the container uses it (:mod:`cbatch.engines.imagehold`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Dict, List, Optional

from cbatch.core.errors import EngineError

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
MS_NOSUID, MS_NODEV = 2, 4
PAGE_LIMIT = 4000       # mount(2) options must fit a page; beyond it the layers go through short links


def lower_dirs(image_attrs: dict) -> List[str]:
    """The image's layer directories, top first (overlay2 ``UpperDir`` then ``LowerDir``)."""
    graph = image_attrs.get("GraphDriver") or {}
    if graph.get("Name") != "overlay2":
        raise EngineError("direct engine", "needs the overlay2 storage driver", graph.get("Name"),
                          "use engine: docker")
    data = graph.get("Data") or {}
    dirs = [data["UpperDir"]] if data.get("UpperDir") else []
    dirs += [d for d in (data.get("LowerDir") or "").split(":") if d]
    if not dirs:
        raise EngineError("image", "no layers reported", image_attrs.get("Id"), "docker image inspect it")
    for d in dirs:
        if not os.path.isdir(d):
            raise EngineError("image", "layer missing", d, "the image was removed or is being pulled")
    return dirs


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise EngineError("rootfs", f"{fstype} mount failed", target, os.strerror(err))


def _short(dirs: List[str]) -> Optional[str]:
    """overlay2's own short links (``../l/<id>``) for a layer list too long for one page."""
    links = []
    for d in dirs:
        try:
            with open(os.path.join(os.path.dirname(d), "link")) as fh:
                links.append(os.path.join(os.path.dirname(os.path.dirname(d)), "l", fh.read().strip()))
        except OSError:
            return None
    return ":".join(links)


def mount(bundle: str, dirs: List[str], layer_bytes: Optional[int]) -> str:
    """Mount ``bundle/rootfs``: ``dirs`` read-only under a fresh upper layer; return the rootfs path."""
    layer = os.path.join(bundle, "layer")
    rootfs = os.path.join(bundle, "rootfs")
    for d in (layer, rootfs):
        os.mkdir(d, 0o700)
    if layer_bytes:
        _mount("cbatch-layer", layer, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(layer_bytes)},mode=0700")
    upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
    os.mkdir(upper, 0o755)
    os.mkdir(work, 0o700)
    lower = ":".join(dirs)
    if len(lower) + len(upper) + len(work) + 64 > PAGE_LIMIT:
        lower = _short(dirs) or lower
    _mount("overlay", rootfs, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work},index=off")
    return rootfs


def resolve(rootfs: str, path: str) -> str:
    """Where ``path`` leads inside the image (its symlinks resolved within ``rootfs``, as the engine reports
    a link target): for messages only, nothing is opened."""
    parts = [p for p in path.split("/") if p]
    done: List[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        if part == ".":
            continue
        here = "/" + "/".join(done + [part])
        try:
            st = os.lstat(rootfs + here)
        except OSError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and hops < 40:
            hops += 1
            link = os.readlink(rootfs + here)
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                done = []
            continue
        done.append(part)
    return "/" + "/".join(done)


def check_targets(rootfs: str, targets: List[str]) -> None:
    """Refuse (EngineError) a mount target passing through a symlink in the image, as the Docker engine does
    (:func:`cbatch.engines.imagecheck.check_targets`, same message): every component is ``lstat``-ed in the
    fresh rootfs (the image's files only; nothing ran in it yet), except those strictly under another target.

    Linear in the targets' components: a component is under another target exactly when one of its
    ancestors, written with a trailing slash, is a target (set lookups, one per component), and a component
    several targets share is looked at once (the fresh rootfs does not change meanwhile)."""
    tops = set(targets)
    # "/x" is strictly under target t exactly when it starts with t.rstrip("/") + "/"; for a component path
    # those strings are its ancestors "/", "/a/", "/a/b/", ... (a target not in this normal form matches none).
    dirs = {t.rstrip("/") + "/" for t in tops}
    seen: Dict[str, bool] = {}          # component path -> exists (a symlink raised at once)
    for target in sorted(tops):
        prefix = ""
        for part in (p for p in target.split("/") if p):
            if prefix + "/" in dirs:
                break                   # this component and all below are under another target
            prefix += "/" + part
            exists = seen.get(prefix)
            if exists is None:
                try:
                    st = os.lstat(rootfs + prefix)
                except FileNotFoundError:
                    seen[prefix] = exists = False
                else:
                    if stat.S_ISLNK(st.st_mode):
                        raise EngineError("mount", "target passes through a symlink in the image",
                                          f"{target} ({prefix} -> {resolve(rootfs, prefix)})",
                                          "the image's symlinks are not followed for mounts; choose another"
                                          " target or an image without that link")
                    seen[prefix] = exists = True
            if not exists:
                break


def full(bundle: str) -> bool:
    """True when the bounded writable layer has (almost) no room left."""
    layer = os.path.join(bundle, "layer")
    try:
        st = os.statvfs(layer)
    except OSError:
        return False
    return os.path.ismount(layer) and st.f_bavail * st.f_frsize < 64 * 1024


def layer_mib(bundle: str) -> int:
    """The bounded layer's size in MiB."""
    st = os.statvfs(os.path.join(bundle, "layer"))
    return st.f_blocks * st.f_frsize // 2 ** 20


def _umount(path: str) -> None:
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise EngineError("rootfs", "unmount failed", path, os.strerror(err))


def release(bundle: str) -> None:
    """Unmount the rootfs and the layer (idempotent); the caller removes the bundle's files."""
    for name in ("rootfs", "layer"):
        path = os.path.join(bundle, name)
        if os.path.ismount(path):
            _umount(path)
