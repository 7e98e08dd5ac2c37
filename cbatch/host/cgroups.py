"""Find a job's cgroup and tidy the empty directories Docker leaves behind. Stdlib only.

TORQUE built with --enable-cgroups makes ``/torque/<jobid>`` in cpuacct, cpuset, memory and devices (cgroup
v1). Slurm makes ``/slurm_<node>/uid_<uid>/job_<id>``. ``docker run --cgroup-parent=<that>`` (cgroupfs
driver) nests the container under the job, so the job's limits hold - but Docker also creates the parent
in every other controller (blkio, freezer, pids, cpu, name=systemd, unified...) and nobody removes those
when the job ends. :func:`tidy` does, with ``rmdir`` only: a cgroup directory can only go with rmdir, and
rmdir refuses a cgroup that still has tasks or children, so tidying can never disturb a live job.

``root`` (default /sys/fs/cgroup) is a parameter everywhere so unit tests can use a fake tree.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Iterable, List, Optional, Tuple

CGROUP_ROOT = "/sys/fs/cgroup"
# The controllers TORQUE itself manages per job: it removes those directories after the epilogue, and
# takes an ENOENT there as an error, so a hook must leave the job directory itself alone in them.
TORQUE_CONTROLLERS = frozenset({"cpuacct", "cpuset", "memory", "devices", "cpu,cpuacct", "cpuacct,cpu"})
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\[\]-]*$")
_SLURM = re.compile(r"^(/slurm(?:_[^/]+)?/uid_\d+/job_\d+)(?:/|$)")


def _safe_parent(parent: str) -> str:
    """A normalised absolute cgroup path without ``..``: tidy must never climb out of the job's parent."""
    if not parent.startswith("/") or "\0" in parent:
        raise ValueError(f"not an absolute cgroup path: {parent!r}")
    parts = [p for p in parent.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"unsafe cgroup path: {parent!r}")
    return "/" + "/".join(parts)


def hierarchies(root: str = CGROUP_ROOT) -> List[str]:
    """The mounted hierarchies under ``root``: v1 controller dirs (memory, cpu,cpuacct, systemd,
    unified...) or, on a pure v2 host, ``root`` itself. Symlinks (cpu -> cpu,cpuacct) are skipped so each
    hierarchy is visited once."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    if "cgroup.controllers" in names:
        return [root]          # pure cgroup v2: the one unified hierarchy is mounted at root itself
    out = []
    for name in names:
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        if os.path.exists(os.path.join(path, "cgroup.procs")):
            out.append(path)
    return out


def _job_parent(job_id: str, rel: str, root: str) -> Optional[str]:
    """``/<rel>`` if the batch system made that cgroup for the job (memory or cpuset on v1, or v2), else None."""
    if not _JOB_ID.match(job_id or ""):
        return None
    for candidate in (os.path.join(root, "memory", rel), os.path.join(root, "cpuset", rel), os.path.join(root, rel)):
        if os.path.isdir(candidate):
            return "/" + rel
    return None


def torque_parent(job_id: str, root: str = CGROUP_ROOT) -> Optional[str]:
    """``/torque/<jobid>`` if TORQUE made a cgroup for the job, else None."""
    return _job_parent(job_id, f"torque/{job_id}", root)


def pbs_parent(job_id: str, root: str = CGROUP_ROOT) -> Optional[str]:
    """``/pbs_jobs.service/jobid/<jobid>`` if OpenPBS's pbs_cgroups hook made the job's cgroup, else None."""
    return _job_parent(job_id, f"pbs_jobs.service/jobid/{job_id}", root)


def slurm_parent_of_pid(pid: int, proc: str = "/proc") -> Optional[str]:
    """The Slurm job cgroup (``/slurm_<node>/uid_<uid>/job_<id>``) the process ``pid`` is in, or None.

    Read from /proc/<pid>/cgroup (the memory line on v1, the ``0::`` line on v2): the kernel writes it, the
    user cannot forge it.
    """
    try:
        with open(os.path.join(proc, str(int(pid)), "cgroup")) as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return None
    found = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        m = _SLURM.match(parts[2])
        if not m:
            continue
        if "memory" in parts[1].split(","):
            return m.group(1)
        found = found or m.group(1)
    return found


def _dirs_under(top: str) -> List[str]:
    """Every directory under ``top`` (inclusive), deepest first, never following symlinks."""
    out = []
    for dirpath, dirnames, _files in os.walk(top, topdown=False, followlinks=False):
        out.append(dirpath)
    return out


def existing(parent: str, root: str = CGROUP_ROOT) -> List[str]:
    """Every directory of ``parent`` (itself and below) that still exists, in any hierarchy."""
    parent = _safe_parent(parent)
    out = []
    for hier in hierarchies(root):
        top = hier + parent
        if os.path.isdir(top):
            out.extend(sorted(_dirs_under(top)))
    return out


def tidy(parent: str, root: str = CGROUP_ROOT, keep_parent_in: Optional[Iterable[str]] = None) -> List[str]:
    """Remove the empty cgroup directories under ``parent`` in every hierarchy, bottom-up, with rmdir.

    ``parent`` itself goes too, except in hierarchies named in ``keep_parent_in``. By default (None) that is
    :data:`TORQUE_CONTROLLERS` for a ``/torque/...`` parent - pbs_mom removes its own directories after the
    epilogue and treats a missing one as an error - and nothing otherwise. Busy cgroups (tasks or children
    left) stay. Returns what is left afterwards (checked again), excluding kept parents.
    """
    parent = _safe_parent(parent)
    if keep_parent_in is None:
        keep_parent_in = TORQUE_CONTROLLERS if parent.startswith("/torque/") else ()
    keep = set(keep_parent_in)
    for hier in hierarchies(root):
        top = hier + parent
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        for path in _dirs_under(top):
            if path == top and os.path.basename(hier) in keep:
                continue
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY, errno.EACCES, errno.EPERM,
                                     errno.ENOTDIR):
                    raise
    left = []
    for hier in hierarchies(root):
        top = hier + parent
        for path in existing_in(top):
            if path == top and os.path.basename(hier) in keep:
                continue
            left.append(path)
    return left


def existing_in(top: str) -> List[str]:
    """Directories at and under ``top`` that exist (empty when ``top`` is gone)."""
    return sorted(_dirs_under(top)) if os.path.isdir(top) else []


def cpu_usage_file(pid: int, cid: str, root: str = CGROUP_ROOT, proc: str = "/proc") -> Optional[str]:
    """The file that counts the CPU time of container ``cid`` whose init process is ``pid``, or None.

    Where the engine put the container (``/docker/<cid>``, a ``--cgroup-parent``, a systemd scope) is read
    from /proc/<pid>/cgroup - written by the kernel, not forgeable from inside - and accepted only if the
    path names ``cid`` (a pid reused after the container exited names another cgroup). cgroup v1's
    ``cpuacct.usage`` (nanoseconds) is preferred; a pure v2 host has ``cpu.stat`` (``usage_usec``).
    """
    try:
        with open(os.path.join(proc, str(int(pid)), "cgroup")) as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        # The direct engine's ids are "direct-<name>" and its cgroup leaf is the container's name.
        names = {cid, f"docker-{cid}.scope", cid[len("direct-"):] if cid.startswith("direct-") else cid}
        if len(parts) != 3 or not names & set(parts[2].split("/")):
            continue
        try:
            rel = _safe_parent(parts[2])
        except ValueError:
            continue
        ctls = parts[1].split(",")
        if "cpuacct" in ctls:
            for name in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
                found.insert(0, os.path.join(root, name) + rel + "/cpuacct.usage")
        elif parts[0] == "0" and not parts[1]:
            found.append(os.path.join(root, "unified") + rel + "/cpu.stat")
            found.append(root + rel + "/cpu.stat")
    return next((path for path in found if os.path.isfile(path)), None)


def read_cpu_ns(path: str) -> Optional[int]:
    """CPU time in nanoseconds from a ``cpuacct.usage`` or ``cpu.stat`` file; None once it is gone."""
    try:
        with open(path) as fh:
            text = fh.read(4096)
    except OSError:
        return None
    if path.endswith("cpu.stat"):
        for line in text.splitlines():
            key, _sep, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) * 1000
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


def favor_dynmods(mounts: str = "/proc/mounts") -> Tuple[Optional[str], Optional[str]]:
    """(the cgroup mount point carrying ``favordynmods``, or None; the mount to set it on, or None).

    Moving a process into a cgroup (runc joining the container's, pbs_mom the job's) takes the kernel's
    global threadgroup rwsem for writing; unless some hierarchy is mounted with ``favordynmods`` (Linux 6.0+)
    that waits for an RCU grace period first: 5-13 ms of every container start on this project's VM, idle,
    not CPU. The option is one mount's but the lock is global, so any one mount suffices; the mount to set
    it on is the cgroup2 one when there is one (the unified hierarchy of a hybrid host), else the first v1."""
    try:
        with open(mounts) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None, None
    v2, v1, favored = None, None, None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
            continue
        point = fields[1].replace("\\040", " ")
        if "favordynmods" in fields[3].split(","):
            favored = favored or point
        if fields[2] == "cgroup2":
            v2 = v2 or point
        else:
            v1 = v1 or point
    return favored, v2 or v1
