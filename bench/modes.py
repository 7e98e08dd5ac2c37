"""Which ways of starting a job one bench run measures, and why a wanted one is not available.

Baselines: ``native`` (the shell runs the script), ``docker_run`` (the docker CLI with cbatch's flags) and
``runc`` (``runc run`` on the same root filesystem). cbatch modes are one per engine and client:
``cbatch_<engine>_<client>`` with engine ``docker`` or ``direct`` (the queue config key ``engine``, issue
#13 part 1) and client ``py`` (the Python shims) or ``c`` (the static C client ``<libexec>/cbatch-client``,
issue #13 part 2, with shims ``#!<libexec>/cbatch-client shim``). A mode whose parts are missing on this
machine or branch is reported as ``not available: <reason>`` and every benchmark runs without it.
"""

from __future__ import annotations

import inspect
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BASELINES = ("native", "docker_run")     # mom-driven baselines; runc is driven by bench.runc
ENGINES = ("docker", "direct")
CLIENTS = ("python", "c")
_SHORT = {"python": "py", "c": "c"}


@dataclass(frozen=True)
class Mode:
    """One way of starting jobs: ``kind`` is native | docker_run | runc | cbatch."""

    name: str
    kind: str
    engine: Optional[str] = None
    client: Optional[str] = None

    @property
    def queue(self) -> str:
        """The bench daemon's queue this mode submits to (one per engine)."""
        return f"bench_{self.engine}" if self.kind == "cbatch" else "batch"


def cbatch_mode(engine: str, client: str) -> Mode:
    """The cbatch mode for ``engine`` and ``client``."""
    return Mode(f"cbatch_{engine}_{_SHORT[client]}", "cbatch", engine, client)


def engine_key_supported() -> Optional[str]:
    """None when this branch's config accepts a per-queue ``engine`` key, else the reason it does not."""
    import yaml
    from cbatch.core import config as configmod
    try:
        configmod.parse(yaml.safe_dump({"queues": {"q": {"engine": "docker"}}}), "bench-probe.yaml")
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return f"config rejects a per-queue 'engine' key ({str(exc).splitlines()[0][:160]})"
    return None


def direct_problem(helper: str) -> Optional[str]:
    """Why the direct engine cannot run here (with ``helper``, cbatch-exec, whose directory holds the
    engine's cbatch-shim), or None."""
    try:
        import cbatch.engines.direct  # noqa: F401
    except ImportError as exc:
        return f"no cbatch.engines.direct on this branch ({exc})"
    why = engine_key_supported()
    if why:
        return why
    if not shutil.which("runc") and not os.path.exists("/usr/sbin/runc"):
        return "runc is not installed"
    shim = os.path.join(os.path.dirname(helper), "cbatch-shim")
    if not os.access(shim, os.X_OK):
        # the router would fall back to Docker for every job: that would measure the docker engine twice
        return f"no {shim} (make -C libexec install)"
    return None


def c_client_problem(path: str) -> Optional[str]:
    """Why the C client at ``path`` cannot be used for the shims, or None."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return f"no C client at {path} (build it: make -C libexec cbatch-client)"
    from cbatch.admin import install
    if install_style() is None:
        return "cbatch.admin.install cannot write C shims on this branch (no client_path= parameter)"
    return None


def install_style() -> Optional[str]:
    """How :func:`cbatch.admin.install.install` is told which client the shims run: ``client_path`` (None =
    Python, a path = the C client), ``hooks`` (``hooks=python|c`` plus ``client=``), or None (Python only)."""
    from cbatch.admin import install
    params = inspect.signature(install.install).parameters
    if "client_path" in params:
        return "client_path"
    if "hooks" in params and "client" in params:
        return "hooks"
    return None


def plan(engines: Sequence[str], clients: Sequence[str], c_client: str, helper: str = "",
         problems: Optional[Dict[str, Optional[str]]] = None) -> Tuple[List[Mode], Dict[str, str]]:
    """The modes to run, in order (baselines, then cbatch per engine and client), and the wanted cbatch
    modes that cannot run with the reason. ``problems`` overrides the probes (``{"direct": reason, "c":
    reason}``; None = available), for tests."""
    if problems is None:
        problems = {}
        if "direct" in engines:
            problems["direct"] = direct_problem(helper or os.path.join(os.path.dirname(c_client), "cbatch-exec"))
        if "c" in clients:
            problems["c"] = c_client_problem(c_client)
    modes = [Mode(b, b) for b in BASELINES]
    missing: Dict[str, str] = {}
    for engine in engines:
        for client in clients:
            mode = cbatch_mode(engine, client)
            why = [w for w in (problems.get(engine), problems.get(client)) if w]
            if why:
                missing[mode.name] = "not available: " + "; ".join(why)
            else:
                modes.append(mode)
    return modes, missing


def engines_in(modes: Sequence[Mode]) -> List[str]:
    """The engines the cbatch modes among ``modes`` use, in order."""
    out: List[str] = []
    for m in modes:
        if m.kind == "cbatch" and m.engine not in out:
            out.append(m.engine)
    return out
