"""The audit trail: one line per container job at its end, and one per refused or native start (#10.14).

Lines go to the ``cbatchd.audit`` logger, which propagates to the daemon's log handlers: the daemon log
(stderr / the journal) and syslog (``daemon.syslog``, LOG_DAEMON). Each line is ``key=value`` pairs after
the fixed prefix ``audit:``, values with spaces quoted, so a site's log tooling can parse them:

``audit: job=12.node event=end user=alice uid=1001 queue=batch batch=torque kind=job mode=container
container=3f2a... image=debian:12 image_id=sha256:... status=0 oom=no signal=- wall_s=12.3
cgroup_cpu_s=11.9 cgroup_peak_bytes=123456789 cpu_s=11.8 peak_bytes=120000000``

``cgroup_*`` are the job's cgroup (``--cgroup-parent``, cgroup v2) totals when the container ended - the
container's own cgroup is gone by then; ``-`` where nothing reports them. ``cpu_s`` and ``peak_bytes`` are
the container's own cgroup's (v1 or v2), read just before it went: the direct engine's shim reads them; the
Docker engine reports ``-``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("cbatchd.audit")
CGROUP_ROOT = "/sys/fs/cgroup"


def _value(v) -> str:
    if v is None or v == "":
        return "-"
    s = str(v).replace("\n", " ")[:300]
    return '"' + s.replace('"', "'") + '"' if (" " in s or "=" in s) else s


def line(**fields) -> str:
    """``audit: k=v k=v ...`` in the given order."""
    return "audit: " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())


def cgroup_usage(parent: Optional[str], root: str = CGROUP_ROOT) -> tuple:
    """``(cpu seconds, peak memory bytes)`` of cgroup v2 ``parent`` (None each where not reported)."""
    if not parent:
        return None, None
    base = os.path.join(root, parent.lstrip("/"))
    cpu = peak = None
    try:
        with open(os.path.join(base, "cpu.stat"), encoding="ascii") as f:
            for row in f:
                key, _, val = row.partition(" ")
                if key == "usage_usec":
                    cpu = round(int(val) / 1e6, 3)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(base, "memory.peak"), encoding="ascii") as f:
            peak = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return cpu, peak


def job_end(sess, status: Optional[int], oom: bool, wall: float, note: str = "", info=None) -> None:
    """The line for a container that ended (``status`` None: killed because its client went away);
    ``info``: the engine's ExitInfo (its container's own CPU time and peak memory, where it read them)."""
    cpu, peak = cgroup_usage(sess.cgroup_parent)
    signal = status - 128 if status is not None and 128 < status < 128 + 65 else None
    fields = dict(job=sess.job_id, event="end", user=sess.user, uid=sess.uid, queue=sess.queue,
                  batch=sess.batch, kind=sess.kind, mode="container", container=sess.cid[:12], image=sess.image,
                  image_id=sess.image_id, status=status, oom="yes" if oom else "no", signal=signal,
                  wall_s=round(wall, 3), cgroup_cpu_s=cpu, cgroup_peak_bytes=peak,
                  cpu_s=getattr(info, "cpu_s", None), peak_bytes=getattr(info, "peak_bytes", None))
    if note:
        fields["note"] = note
    log.info("%s", line(**fields))


def native(reg, uid: int, kind: str, reason: str) -> None:
    """A job (or ``cbatch run``) the policy runs natively: the daemon does not see its end."""
    log.info("%s", line(job=reg.job_id, event="native", user=reg.user, uid=uid, queue=reg.queue, batch=reg.batch,
                        kind=kind, mode="native", reason=reason))


def refused(reg, uid: int, kind: str, message: str) -> None:
    """A start or run the daemon refused (policy, limits, image checks...)."""
    log.warning("%s", line(job=reg.job_id, event="refused", user=reg.user, uid=uid, queue=reg.queue,
                           batch=reg.batch, kind=kind, mode="-", reason=message))
