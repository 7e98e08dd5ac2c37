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
stderr (slurmd's log at debug level) and syslog (``cbatch-slurm``). The register /
unregister / tidy sequence itself is the Torque hooks' (:func:`cbatch.clients.hooks.register_job`,
:func:`cbatch.clients.hooks.unregister_job`); this module only reads the job from slurmd's environment.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from cbatch.clients import hooks


PROLOG = hooks.Who("cbatch: slurm prolog", "cbatch-slurm")
EPILOG = hooks.Who("cbatch: slurm epilog", "cbatch-slurm")


def job_cgroup(env: Mapping[str, str]) -> Optional[str]:
    """The job's cgroup path as Slurm's cgroup/v1 plugin names it, or None if the environment lacks a part."""
    node = env.get("SLURMD_NODENAME", "")
    uid = env.get("SLURM_JOB_UID", "")
    job = env.get("SLURM_JOB_ID", "")
    if not (node and uid.isdigit() and job.isdigit()) or "/" in node or node.startswith("."):
        return None
    return f"/slurm_{node}/uid_{int(uid)}/job_{int(job)}"


def _job_id(env: Mapping[str, str]) -> str:
    return env.get("SLURM_JOB_ID", "") or "?"


def prologue(args) -> int:
    """slurmd's Prolog: register the job. Always 0 (see the module docstring)."""
    from cbatch.core.job import Registration

    env = dict(os.environ)
    return hooks.register_job(PROLOG, _job_id(env), getattr(args, "socket", None),
                              lambda: Registration.from_slurm_env(env))


def epilogue(args) -> int:
    """slurmd's Epilog: unregister the job, then tidy its leftover cgroup directories. Always 0."""
    env = dict(os.environ)
    return hooks.unregister_job(EPILOG, _job_id(env), getattr(args, "socket", None), job_cgroup(env))
