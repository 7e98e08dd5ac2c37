"""The batch system's root prologue and epilogue: register the job with cbatchd, unregister it, tidy up.

pbs_mom runs ``mom_priv/prologue`` as root with 8 arguments (jobid user group name resource_list queue
account script), ``PATH=/bin:/usr/bin`` and nothing else useful, in the forked child that then becomes the
job starter: so the prologue's parent pid is the job's session id. What its exit status means to pbs_mom
decides how we fail:

- 0: the job goes on.
- 1: the job is aborted and NO .o/.e file reaches the user - the user learns nothing.
- anything else (or a crash, a timeout): the job is requeued and rerun at once, in a tight loop, forever.

So the prologue exits 0 whatever happens - junk arguments, an unknown user, a daemon that is down. It logs
to syslog (and to stderr, which pbs_mom appends to the job's .e file) and lets the job starter report the
problem in the job's own words: the starter then finds no registration, or no daemon, and says so on one
line in the .e file, exit 125. The epilogue (11 arguments) likewise never fails: it unregisters the job (the
daemon removes its containers by label and lists again), then removes the empty cgroup directories Docker
created under the job's TORQUE cgroup. With the daemon down it does nothing destructive: rmdir only.

Stdlib + cbatch.clients.client only: these run on every job start.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence

from cbatch.host import cgroups
from cbatch.clients import client
from cbatch.core import job
from cbatch.core.errors import CbatchError, _clean

REGISTER_TIMEOUT = 30.0     # < pbs_mom's $prologalarm (300 s): a hung daemon must not get the job requeued
UNREGISTER_RETRY = 20.0     # an epilogue waits this long for a daemon that is restarting (< $prologalarm)
UNREGISTER_EVERY = 1.0
_UNREACHABLE = ("not reachable", "closed the connection without a reply")


class Who(NamedTuple):
    """How a hook signs its log lines: the line's prefix and the syslog ident."""

    prefix: str
    ident: str


PROLOGUE = Who("cbatch prologue", "cbatch-prologue")
EPILOGUE = Who("cbatch epilogue", "cbatch-epilogue")


def _log(who: Who, message: str, error: bool = True) -> None:
    """One line to syslog (the admin's record) and to stderr (the job's .o/.e, ahead of its output)."""
    line = f"{who.prefix}: {_clean(message)}"
    try:
        import syslog
        syslog.openlog(who.ident, syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, line)
        syslog.closelog()
    except Exception:  # noqa: BLE001 - no syslog (containers, tests) must not fail the hook
        pass
    if error:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _socket(socket_path: Optional[str]) -> str:
    return socket_path or client.DEFAULT_SOCKET


def prologue_main(argv: Sequence[str], socket_path: Optional[str] = None) -> int:
    """Torque prologue: register the job (session id = our parent). Always returns 0 (see module doc)."""
    return register_job(PROLOGUE, _job_of(argv), socket_path,
                        lambda: job.Registration.from_prologue_argv(list(argv), session_id=os.getppid()))


def epilogue_main(argv: Sequence[str], socket_path: Optional[str] = None) -> int:
    """Torque epilogue (11 args): unregister, then tidy the job's cgroup leftovers. Always returns 0."""
    args = list(argv)
    if len(args) == 12:
        args = args[1:]
    job_id = args[0] if args else ""
    if len(args) != 11 or not job_id:
        _log(EPILOGUE, f"expected 11 arguments from pbs_mom, got {len(args)}: {' '.join(args)[:200]}")
        return 0
    # pbs_mom removes its own /torque/<jobid> directories afterwards; we remove the empty ones Docker made.
    return unregister_job(EPILOGUE, job_id, socket_path, f"/torque/{job_id}")


def register_job(who: Who, job_id: str, socket_path: Optional[str], build: Callable[[], "job.Registration"]) -> int:
    """Register the Registration ``build()`` makes (Torque argv or Slurm env). Any failure - a malformed
    job, an unknown user, a daemon that is down - is logged, never raised: returns 0 for the batch system."""
    try:
        client.call(_socket(socket_path), "register", _timeout=REGISTER_TIMEOUT, registration=build().to_dict())
    except CbatchError as exc:
        _log(who, f"job {job_id} not registered: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - a crash would requeue (Torque) or drain the node (Slurm)
        _log(who, f"job {job_id} not registered: internal error: {type(exc).__name__}: {exc}")
    return 0


def unregister_job(who: Who, job_id: str, socket_path: Optional[str], cgroup_parent: Optional[str]) -> int:
    """Unregister ``job_id`` (the daemon removes its containers and answers what it could not), then remove
    the empty cgroup directories Docker left under ``cgroup_parent``. Logs, never raises; returns 0."""
    try:
        reply = _unregister(_socket(socket_path), job_id)
        left = reply.get("leftovers") or []
        if left:
            _log(who, f"job {job_id}: containers left after removal: {' '.join(map(str, left))}")
    except CbatchError as exc:
        # Nothing destructive without the daemon: it owns the engine. What we leave, its start-up sweep
        # removes (the job's session is gone): say so in the node's log.
        _log(who, f"job {job_id} not unregistered: {exc.message}; left for cbatchd's start-up sweep: the job's "
                  f"registration and any container labelled cbatch.job={job_id}")
    except Exception as exc:  # noqa: BLE001
        _log(who, f"job {job_id} not unregistered: internal error: {type(exc).__name__}: {exc}")
    # Even when the daemon could not be reached: empty directories are ours to remove either way (rmdir only).
    if cgroup_parent:
        _tidy(who, job_id, cgroup_parent)
    return 0


def _unregister(path: str, job_id: str) -> dict:
    """``unregister``, retried for :data:`UNREGISTER_RETRY` seconds while no daemon answers (a restart);
    a daemon that answers with an error is not retried."""
    import time
    deadline = time.monotonic() + UNREGISTER_RETRY
    while True:
        try:
            return client.call(path, "unregister", _timeout=REGISTER_TIMEOUT, job_id=job_id)
        except CbatchError as exc:
            if getattr(exc, "problem", "") not in _UNREACHABLE or time.monotonic() >= deadline:
                raise
        time.sleep(UNREGISTER_EVERY)


def _tidy(who: Who, job_id: str, parent: str) -> List[str]:
    """Remove the empty directories Docker made under ``parent`` in every controller; log what is left."""
    try:
        if not cgroups.existing(parent):
            return []
        left = cgroups.tidy(parent)
        if left:
            _log(who, f"job {job_id}: cgroups still busy: {' '.join(left)}")
        return left
    except Exception as exc:  # noqa: BLE001
        _log(who, f"job {job_id}: cgroup tidy failed: {type(exc).__name__}: {exc}")
        return []


def _job_of(argv: Sequence[str]) -> str:
    args = list(argv)
    return _clean(args[0])[:80] if args else "(no job id)"


def prologue_command(args) -> int:
    """``cbatch prologue ARGS...`` (pbs_mom's). ``--slurm`` routes to :func:`cbatch.clients.slurm.prologue`
    in cli.py, so this module never imports slurm (which imports this one)."""
    return prologue_main(args.args, socket_path=args.socket)


def epilogue_command(args) -> int:
    """``cbatch epilogue ARGS...`` (pbs_mom's); ``--slurm`` is routed to slurm.py by cli.py."""
    return epilogue_main(args.args, socket_path=args.socket)
