"""cbatchd with timing probes: where the daemon spends a job's start and end, measured on the real path.

``python -I bench/tracedaemon.py CONFIG OUT`` runs the real ``cbatch.daemon.server.main`` after wrapping a few
functions with a timer (microseconds of overhead per call): the daemon's register / unregister handlers, and
inside a start request each step the request takes (peer check, registry claim, script read and parse, policy,
image check, engine create and start, registry write; the direct engine's start and remove where it exists)
plus ``start_to_started`` - from the request's arrival in :func:`cbatch.daemon.launch.start` to the
``started`` event - and the engine calls themselves (Docker API create, start, remove, list). Nothing is
changed but the timing. On SIGUSR2 the durations collected so far are written to OUT as JSON (``{name: [ms,
...]}``) and cleared; :meth:`bench.env.Daemon.trace` asks for that.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time

_times: dict = {}
_local = threading.local()


def _record(name: str, ms: float) -> None:
    _times.setdefault(name, []).append(ms)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(name, (time.perf_counter() - t0) * 1000)
    return wrapper


def _patch(owner, attr: str, name: str) -> None:
    """Wrap ``owner.attr``; a probe whose target was renamed is skipped (and says so on stderr)."""
    fn = getattr(owner, attr, None)
    if fn is None:
        print(f"tracedaemon: no {getattr(owner, '__name__', owner)}.{attr}: probe {name} skipped", file=sys.stderr)
        return
    setattr(owner, attr, _timed(name, fn))


def install() -> None:
    """Wrap the probes (see the module docstring)."""
    import docker.api.client
    from cbatch.daemon import server as daemon
    from cbatch.core import directives
    from cbatch.engines import docker as engine
    from cbatch.daemon import imagesync
    from cbatch.daemon import launch
    from cbatch.daemon import peers
    from cbatch.core import policy
    from cbatch.daemon import registry

    for key in ("register", "unregister"):
        if key in daemon._HANDLERS:
            daemon._HANDLERS[key] = _timed(f"op_{key}", daemon._HANDLERS[key])
    for owner, attr, name in (
            (peers, "start_job", "start.peer_check"), (registry.Registry, "claim_start", "start.registry_claim"),
            (launch, "read_script", "start.read_script"), (directives, "parse_script", "start.parse_script"),
            (policy, "decide", "start.policy_decide"), (launch, "_resolver", "start.resolve_paths"),
            (launch, "_cgroup_parent", "start.cgroup_parent"),
            (imagesync.ImageManager, "ensure", "start.image_check"), (engine.Engine, "start", "start.engine_start"),
            (registry.Registry, "add_container", "start.registry_add_container"),
            (registry.Registry, "replace_container", "start.registry_replace_container"),
            (engine.Engine, "remove", "end.engine_remove"), (engine.Engine, "cleanup", "end.engine_cleanup"),
            (registry.Registry, "register", "registry.register"),
            (registry.Registry, "unregister", "registry.unregister"),
            (docker.api.client.APIClient, "create_container", "api.create_container"),
            (docker.api.client.APIClient, "start", "api.start"),
            (docker.api.client.APIClient, "remove_container", "api.remove_container"),
            (docker.api.client.APIClient, "containers", "api.list_containers")):
        _patch(owner, attr, name)

    try:        # the direct engine (issue #13), on branches that have it
        from cbatch.engines import direct
    except ImportError:
        direct = None
    if direct is not None:
        for attr, name in (("start", "start.direct_start"), ("remove", "end.direct_remove")):
            _patch(getattr(direct, "DirectEngine", None), attr, name)

    start, supervise = launch.start, launch.supervise

    def traced_start(*args, **kwargs):
        _local.t0 = time.perf_counter()
        return start(*args, **kwargs)

    def traced_supervise(*args, **kwargs):
        t0 = getattr(_local, "t0", None)
        if t0 is not None:
            _record("start_to_started", (time.perf_counter() - t0) * 1000)
            _local.t0 = None
        return supervise(*args, **kwargs)

    launch.start, launch.supervise = traced_start, traced_supervise


def main(config: str, out: str) -> int:
    """Run cbatchd (foreground) on ``config`` with the probes; SIGUSR2 dumps them to ``out``."""
    install()

    def dump(signum, frame) -> None:
        data = {k: list(v) for k, v in list(_times.items())}
        _times.clear()
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, out)

    signal.signal(signal.SIGUSR2, dump)
    from cbatch.daemon import server as daemon
    return daemon.main(["--foreground", "--config", config])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
