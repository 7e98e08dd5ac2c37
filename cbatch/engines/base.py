"""What the daemon needs from a container engine, whichever runs the job (``docker`` or ``direct``).

An engine implements: ``start(spec, stdio, instance, helper) -> id`` (created and started, its mounts done
before it returns, so pinned staging points may go), ``wait(id) -> ExitInfo`` (blocks, survives a daemon
restart by asking again), ``signal(id, signum)``, ``stop(id, grace)``, ``running(id)``, ``status(id)``
(``created``/``running``/``exited``/``gone``), ``container_pid(id)``, ``cgroup_name(id)`` (what the
container's cgroup path names it by: a pid is the container's only if its cgroup does), ``remove(id)`` (idempotent),
``list_ids(labels)`` and ``cleanup(labels)`` (by cbatch's labels), and ``proxied(id)``: whether the
daemon must proxy the stdio the engine could not hand over (:class:`Stdio`), through ``attach(id)`` (the
stream the start opened, or the one ``reattach(id, stdin)`` opened for a session taken back after a restart). Images are Docker's in both
cases (:mod:`cbatch.engines.dockerimages`). :mod:`cbatch.engines.router` picks the engine per queue.
"""

from __future__ import annotations

import signal as _signal
import time
from dataclasses import dataclass
from typing import Optional, Tuple

ENGINES = ("docker", "direct")


@dataclass(frozen=True)
class Stdio:
    """Where the job's stdio goes.

    ``stdout_path``/``stderr_path``: host paths of existing regular files (the job's spool files, staged);
    the Docker engine's helper appends to them. ``None`` means that stream comes through the attach socket
    (when ``attach``) or is discarded. ``attach``: the caller proxies stdio through ``Engine.attach`` and
    :class:`cbatch.daemon.streams.Pump`. ``fds``: the client's own descriptors (stdin, stdout, stderr): the
    direct engine makes them the container process's stdio itself (no bind mount, no proxy).
    """

    stdout_path: Optional[str] = None
    stderr_path: Optional[str] = None
    attach: bool = False
    tty: bool = False           # interactive jobs: the container gets a terminal; the attach stream is raw
    fds: Tuple[Optional[int], ...] = ()


@dataclass(frozen=True)
class ExitInfo:
    """How a container ended: ``status`` as a shell reports it (128+N for signal N), OOM, engine error."""

    status: int
    oom_killed: bool = False
    error: Optional[str] = None
    notice: Optional[str] = None     # one complete ``cbatch: ...`` line for the job's error file
    cpu_s: Optional[float] = None    # the container's own cgroup's CPU time and peak memory, read before it
    peak_bytes: Optional[int] = None  # goes (the direct engine's shim; None where not reported)


def stop(engine, cid: str, grace: float) -> None:
    """SIGTERM, then SIGKILL when ``cid`` still runs after ``grace`` seconds (a float, unlike docker stop):
    the same for every engine, through its ``signal`` and ``running``."""
    engine.signal(cid, _signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, grace)
    while time.monotonic() < deadline:
        if not engine.running(cid):
            return
        time.sleep(0.05)
    engine.signal(cid, _signal.SIGKILL)
