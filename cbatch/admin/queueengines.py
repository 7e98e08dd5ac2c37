"""``cbatch check --node``: which engine each queue's containers get on this node, and why.

The daemon's router (:class:`cbatch.engines.router.Router`) decides per container: a queue's ``engine: docker``
is Docker; ``direct`` and ``auto`` are the direct engine unless the container needs what only Docker gives (a
network other than ``none``, devices, a terminal) or this node lacks what the direct engine needs (runc, the
shim, the seccomp profile, the overlay2 storage driver). This module asks the same router the same question
for each queue's default job (its default network, no devices, a batch job), so the answer is the daemon's
own, with its reason. A queue that asks for ``direct`` and gets Docker on this node is a FAIL (the admin
asked for something this node cannot give); ``auto`` falling back is information.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

from cbatch.core.spec import ContainerSpec
from cbatch.engines.base import Stdio
from cbatch.engines.direct import DirectEngine
from cbatch.engines.docker import Engine
from cbatch.engines.router import Router, bundles_dir


def router_for(cfg, timeout: float = 10.0) -> Router:
    """A router like the daemon's (same engine URL, same direct engine bundles); nothing is started."""
    docker = Engine(cfg.engine.url, timeout=timeout)
    instance = cfg.daemon.instance or cfg.daemon.hostname or "check"
    return Router(docker, DirectEngine(docker, bundles_dir(cfg.daemon.mount_dir), instance, timeout=timeout))


def _probe(qp) -> ContainerSpec:
    """The container a plain batch job of queue ``qp`` would ask for, as far as the router looks at it."""
    return ContainerSpec(name="cbatch-check", image=qp.image, argv=("/bin/sh",), uid=0, gid=0, groups=(),
                         workdir="/", env=(), network=qp.network, engine=qp.engine)


def decide(router, qp, helper: str) -> Tuple[str, Optional[str]]:
    """``(engine, reason)`` for a plain batch job of queue ``qp``: reason is None when the queue gets what its
    ``engine`` key asks for, else why not (the router's words)."""
    if qp.engine == "docker":
        return "docker", None
    reason = router.why_not_direct(_probe(qp), Stdio(), helper)
    return ("direct", None) if reason is None else ("docker", reason)


def lines(cfg, router, helper: Optional[str] = None) -> Iterator[Tuple[bool, str, str]]:
    """``(ok, what, detail)`` per queue (the defaults when the config names no queue)."""
    helper = helper or cfg.daemon.helper
    queues = [name for name, _qp in cfg.queues] or ["(defaults)"]
    for name in queues:
        qp = cfg.queue(name) if name != "(defaults)" else cfg.defaults
        what = f"queue {name}"
        engine, reason = decide(router, qp, helper)
        notes = [f"engine: {qp.engine}"]
        if qp.image == "native" and qp.native:
            notes.append("native unless a job asks for an image")
        others = [n for n in qp.networks if n != "none"]
        if engine == "direct" and others:
            notes.append(f"--network {'/'.join(others)}: docker")
        if engine == "direct":
            notes.append("qsub -I: docker")
        if reason is None:
            yield True, what, f"{engine} ({'; '.join(notes)})"
        else:
            yield qp.engine != "direct", what, f"docker instead of direct: {reason} ({'; '.join(notes)})"
