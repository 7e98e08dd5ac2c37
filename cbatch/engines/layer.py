"""A bound on the container's writable layer: a size-limited tmpfs under the engine's overlay2 layer.

overlay2 on ext4 has no per-container size option, so a job writing into the image's own filesystem
(/var/tmp, /opt) fills the engine's disk. Between create and start, cbatchd mounts a tmpfs of the queue's
``hardening.layer_size`` on the container's layer directory (the parent of GraphDriver.Data.UpperDir, which
holds ``link``, ``lower``, ``diff``, ``work``) and copies those entries into it; the engine then mounts the
overlay with its upper and work dirs on that tmpfs. Writes past the size get ENOSPC; the pages are charged
to the memory cgroup of the process that writes them (the job). The engine cannot remove a layer directory
with a mount on it, so :func:`release` unmounts it first (remove, cleanup and recovery all go through it).

Only root runs this (cbatchd), in the engine's mount namespace, on paths taken from the engine's inspect
and checked to lie under its overlay2 directory (never a path a user named).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from typing import Optional

from cbatch.core.errors import EngineError

SOURCE = "cbatch-layer"            # the tmpfs's device name: how release() recognises its own mounts
MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 0x2
FULL_BELOW = 1024 * 1024           # less than this free at the end: the job ran out of layer space

_libc = ctypes.CDLL(None, use_errno=True)


def layer_dir(inspect: dict) -> Optional[str]:
    """The container's overlay2 layer directory from its inspect, or None if it has none (other driver)."""
    graph = inspect.get("GraphDriver") or {}
    upper = (graph.get("Data") or {}).get("UpperDir") or ""
    if graph.get("Name") != "overlay2" or not upper.endswith("/diff"):
        return None
    path = os.path.dirname(upper)
    parent = os.path.dirname(path)
    # Only ever a direct child of the engine's overlay2 directory.
    if not path.startswith("/") or os.path.basename(parent) != "overlay2" or os.path.normpath(path) != path \
            or "/../" in path or os.path.basename(path) in ("", ".", ".."):
        return None
    return path


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounted(path: str) -> bool:
    """True when our tmpfs is mounted exactly at ``path``."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) > 4 and len(rest) > 1 and _unescape(fields[4]) == path \
                        and rest[0] == "tmpfs" and rest[1] == SOURCE:
                    return True
    except OSError:
        return False
    return False


def bound(path: str, size: int) -> None:
    """Mount a tmpfs of ``size`` bytes on the layer directory ``path``, keeping its entries."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)   # the directory under the mount
    try:
        mode = os.fstat(fd).st_mode & 0o7777
        opts = f"size={int(size)},mode={mode:o},nr_inodes=0".encode()
        if _libc.mount(SOURCE.encode(), path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
            err = ctypes.get_errno()
            raise EngineError("hardening", "cannot bound the writable layer", path, os.strerror(err))
        try:
            below = f"/proc/self/fd/{fd}"
            for name in os.listdir(below):
                src, dst = os.path.join(below, name), os.path.join(path, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True)
                    shutil.copystat(src, dst)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
        except OSError as exc:
            release(path)
            raise EngineError("hardening", "cannot bound the writable layer", path, str(exc)) from exc
    finally:
        os.close(fd)


def full(path: str) -> bool:
    """True when our tmpfs at ``path`` has (almost) no space left."""
    if not mounted(path):
        return False
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < FULL_BELOW


def release(path: str) -> None:
    """Unmount our tmpfs from ``path`` (detached: a last user keeps it until it is gone); idempotent."""
    while mounted(path):
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise EngineError("hardening", "cannot unmount the writable layer", path, os.strerror(err))
