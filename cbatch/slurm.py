"""Slurm's Prolog and Epilog for cbatch (``cbatch prologue --slurm`` / ``cbatch epilogue --slurm``).

slurmd runs them as root with the job described only in the environment (``SLURM_JOB_ID``,
``SLURM_JOB_UID``, ``SLURM_JOB_USER``, ``SLURM_JOB_PARTITION``, ``SLURMD_NODENAME`` ...); that environment
is built by slurmd, not by the user, so it is trusted like pbs_mom's argv. With ``PrologFlags=Alloc`` the
Prolog runs when the allocation reaches the node, before the batch script or any ``srun`` step, so the job
is registered before anything in it can call ``cbatch run``.

Prolog: register the job with cbatchd (``batch="slurm"``, no session id: the daemon authorises ``run``
requests by the caller's cgroup ``/slurm_<node>/uid_<uid>/job_<id>``).
Epilog: unregister it (the daemon stops and removes the job's containers and answers what it could not
remove), then remove the empty ``job_<id>`` directories Docker created in the controllers Slurm does not
manage (``--cgroup-parent`` makes the path in every controller and nobody else removes them).

Neither ever fails the job: a non-zero Prolog makes Slurm drain the node and requeue the job, so any
trouble (daemon down, malformed environment) is logged and the hook exits 0. Logged where an admin looks:
stderr (slurmd's log at debug level) and syslog (``cbatch-slurm``).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

from cbatch import client
from cbatch.errors import CbatchError

LOG_IDENT = "cbatch-slurm"
# slurmd waits for the Prolog without limit by default (PrologEpilogTimeout): a hung daemon must not hold
# every job on the node, so a registration gets this long and the job then runs unregistered.
HOOK_TIMEOUT = 30.0


def _log(text: str) -> None:
    """One line to stderr and to syslog; logging must never be the reason a hook fails."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass
    try:
        import syslog
        syslog.openlog(LOG_IDENT, syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, text)
    except Exception:       # no syslog on this node: stderr is enough
        pass


def _socket(args) -> str:
    # Root hooks take the socket only from their own command line (the shim slurmd runs), never from the
    # environment: the environment is slurmd's, but an explicit argument is the admin's decision.
    return getattr(args, "socket", None) or client.DEFAULT_SOCKET


def job_cgroup(env: Mapping[str, str]) -> Optional[str]:
    """The job's cgroup path as Slurm's cgroup/v1 plugin names it, or None if the environment lacks a part."""
    node = env.get("SLURMD_NODENAME", "")
    uid = env.get("SLURM_JOB_UID", "")
    job = env.get("SLURM_JOB_ID", "")
    if not (node and uid.isdigit() and job.isdigit()) or "/" in node or node.startswith("."):
        return None
    return f"/slurm_{node}/uid_{int(uid)}/job_{int(job)}"


def register(env: Mapping[str, str], socket_path: str) -> dict:
    """Build the registration from slurmd's environment and send it; returns the daemon's reply."""
    from cbatch.job import Registration

    reg = Registration.from_slurm_env(env)
    return client.call(socket_path, "register", _timeout=HOOK_TIMEOUT, registration=reg.to_dict())


def unregister(env: Mapping[str, str], socket_path: str) -> dict:
    """Tell the daemon the job is over (it stops and removes the job's containers)."""
    job_id = env.get("SLURM_JOB_ID", "")
    return client.call(socket_path, "unregister", _timeout=HOOK_TIMEOUT, job_id=job_id)


def tidy(env: Mapping[str, str]) -> list:
    """Remove the empty cgroup directories left under the job's path; returns what is still there."""
    path = job_cgroup(env)
    if path is None:
        return []
    from cbatch import cgroups
    return list(cgroups.tidy(path) or [])


def prologue(args) -> int:
    """slurmd's Prolog: register the job. Always 0 (see the module docstring)."""
    env = dict(os.environ)
    try:
        register(env, _socket(args))
    except CbatchError as exc:
        _log(f"cbatch: slurm prolog: job {env.get('SLURM_JOB_ID', '?')}: {exc.message}")
    except Exception as exc:    # a bug must not drain the node; the job runs, `cbatch run` will refuse
        _log(f"cbatch: slurm prolog: job {env.get('SLURM_JOB_ID', '?')}: internal error: "
             f"{type(exc).__name__}: {exc}")
    return 0


def epilogue(args) -> int:
    """slurmd's Epilog: unregister the job, then tidy its leftover cgroup directories. Always 0."""
    env = dict(os.environ)
    job = env.get("SLURM_JOB_ID", "?")
    try:
        reply = unregister(env, _socket(args))
        left = reply.get("leftovers") or []
        if left:
            _log(f"cbatch: slurm epilog: job {job}: containers left: {' '.join(map(str, left))}")
    except CbatchError as exc:
        _log(f"cbatch: slurm epilog: job {job}: {exc.message}")
    except Exception as exc:
        _log(f"cbatch: slurm epilog: job {job}: internal error: {type(exc).__name__}: {exc}")
    # Tidy even when the daemon could not be reached: empty directories are ours to remove either way.
    try:
        rest = tidy(env)
        if rest:
            _log(f"cbatch: slurm epilog: job {job}: cgroup directories left: {' '.join(map(str, rest))}")
    except Exception as exc:
        _log(f"cbatch: slurm epilog: job {job}: cgroup tidy failed: {type(exc).__name__}: {exc}")
    return 0
