"""Which registered job does a connected peer belong to? Answered from /proc, never from the request.

The peer's pid and uid come from SO_PEERCRED. For Torque (and ``cbatch local``) the job is identified by its
session: pbs_mom makes the job starter a session leader and the job's session id is the starter's pid, so
every process of the job carries that session id in field 6 of ``/proc/<pid>/stat``. For Slurm, the job's
processes live in ``/slurm_<node>/uid_<uid>/job_<id>/`` (or ``/slurm/uid_<uid>/job_<id>/``) in
``/proc/<pid>/cgroup``, which only root (slurmd) can change.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

from cbatch.core.errors import AccessDenied, PolicyError
from cbatch.core.job import Identity, Registration

_SLURM = re.compile(r"(/slurm(?:_[^/]+)?/uid_(\d+)/job_(\d+))(?:/|$)")


def proc_stat(pid: int) -> Tuple[int, int]:
    """``(session id, start time in clock ticks)`` of ``pid``. AccessDenied if the process is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AccessDenied("peer", "process is gone", pid) from exc
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[3]), int(fields[19])     # field 6 (session) and field 22 (starttime)


def session_of(pid: int) -> int:
    """The session id of ``pid``."""
    return proc_stat(pid)[0]


def start_time(pid: int) -> Optional[int]:
    """The start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        return proc_stat(pid)[1]
    except (AccessDenied, ValueError, IndexError):
        return None


def umask_of(pid: int) -> Optional[int]:
    """The umask of ``pid`` from /proc/<pid>/status (Linux 4.7+), or None when the kernel does not say.

    Read by the daemon rather than sent by the client: it is a fact about the process, like its session,
    and the container's files must get the same modes the job's own processes would give them (pbs_mom
    starts jobs with umask 0077).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for raw in f:
                if raw.startswith(b"Umask:"):
                    return int(raw.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid: int, started: Optional[int]) -> bool:
    """True if ``pid`` still runs and is the same process (same start time) we recorded."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def slurm_job_of(pid: int) -> Optional[Tuple[int, str, str]]:
    """``(uid, job id, job cgroup path)`` from the Slurm job cgroup ``pid`` is in, or None."""
    try:
        with open(f"/proc/{int(pid)}/cgroup", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        m = _SLURM.search(line.split(":", 2)[-1])
        if m:
            return int(m.group(2)), m.group(3), m.group(1)
    return None


def owner_uid(reg: Registration) -> int:
    """The host uid of the job's owner (looked up by name, cross-checked against Slurm's uid)."""
    uid = Identity.lookup(reg.user).uid
    if reg.uid is not None and reg.uid != uid:
        raise PolicyError("job", "owner uid does not match the host's", f"{reg.user}: {reg.uid} != {uid}")
    return uid


def start_job(registry, pid: int, uid: int):
    """The record of the job a job starter (``pid``, ``uid``) may start; AccessDenied otherwise.

    The starter must be the session leader whose pid the prologue registered as the job's session id, and
    run as the job's owner.
    """
    rec = registry.by_session(pid)
    if rec is None:
        raise AccessDenied("start", "no registered job has this session", f"pid {pid}",
                           "the job starter must be the session leader the prologue registered")
    if session_of(pid) != pid:
        raise AccessDenied("start", "peer is not a session leader", f"pid {pid}")
    job_uid = owner_uid(rec.registration)
    if uid != job_uid:
        raise AccessDenied("start", "peer is not the job's owner",
                           f"uid {uid} for job {rec.registration.job_id} of uid {job_uid}")
    return rec


def run_job(registry, pid: int, uid: int):
    """The record of the job a ``cbatch run`` caller belongs to; AccessDenied otherwise."""
    sid = session_of(pid)
    rec = registry.by_session(sid)
    if rec is None:
        found = slurm_job_of(pid)
        if found is not None:
            cg_uid, job_id, _path = found
            cand = registry.get(job_id)
            if cand is not None and cand.registration.batch == "slurm" and cg_uid == uid:
                rec = cand
    if rec is None:
        raise AccessDenied("cbatch run", "not inside a registered job", f"pid {pid}",
                           "cbatch run works only inside a batch job on a cbatch node")
    job_uid = owner_uid(rec.registration)
    if uid != job_uid:
        raise AccessDenied("cbatch run", "caller is not the job's owner",
                           f"uid {uid} for job {rec.registration.job_id} of uid {job_uid}")
    return rec
