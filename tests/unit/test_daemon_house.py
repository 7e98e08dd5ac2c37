"""Issue #12, daemon parts: no import circle, fail closed on a missing module, one Adoptions object."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cbatch.daemon.adoptions import Adoptions


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_recovery_and_cleanup_do_not_import_the_server():
    r = _py("import sys, cbatch.daemon.recovery, cbatch.daemon.cleanup, cbatch.daemon.launch\n"
            "print('cbatch.daemon.server' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("module", ["cbatch.daemon.imagesync", "cbatch.host.cgroups", "cbatch.core.policy",
                                    "cbatch.daemon.recovery"])
def test_a_missing_module_stops_the_daemon_at_start(module):
    # sys.modules[name] = None makes every import of it fail, as a missing file would.
    r = _py(f"import sys; sys.modules[{module!r}] = None\nfrom cbatch.daemon import server")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and module in r.stderr, r.stderr[-500:]


def test_adoptions_take_only_by_the_right_client_and_expire():
    now = [100.0]
    a = Adoptions(clock=lambda: now[0])
    import os
    from cbatch.daemon import peers
    me = {"peer": os.getpid(), "peer_start": peers.start_time(os.getpid()), "uid": os.getuid()}
    a.add("c1", "1.node", me, wait=10)
    a.add("c2", "1.node", {**me, "peer": 1}, wait=10)
    a.add("c3", "2.node", me, wait=10)
    assert a.take("c1", "other.job", os.getpid(), os.getuid()) is None      # wrong job
    assert a.take("c1", "1.node", os.getpid(), os.getuid() + 1) is None     # wrong uid
    assert a.take("c1", "1.node", os.getpid(), os.getuid())["peer"] == os.getpid()
    assert a.take("c1", "1.node", os.getpid(), os.getuid()) is None         # taken once
    assert a.forget_job("2.node") == ["c3"]
    now[0] = 111.0
    assert a.take("c2", "1.node", 1, os.getuid()) is None                   # too late
    assert a.expire() == [("c2", "1.node")] and len(a) == 0


def test_adopted_runs_hold_their_jobs_run_slots_until_released():
    """A restarted daemon counts the cbatch run containers it adopts against the per-job cap: a slot per run
    from adoption until its session ends, its job is forgotten, or its client never comes back."""
    import os
    from cbatch.daemon import peers
    from cbatch.daemon.limits import Counter
    now = [100.0]
    runs = Counter()
    a = Adoptions(clock=lambda: now[0], runs=runs)
    me = {"peer": os.getpid(), "peer_start": peers.start_time(os.getpid()), "uid": os.getuid()}
    a.add("r1", "1.node", {**me, "kind": "run"}, wait=10)
    a.add("r1", "1.node", {**me, "kind": "run"}, wait=10)       # seen again: still one slot
    a.add("r2", "1.node", {**me, "kind": "run", "peer": 1}, wait=10)
    a.add("j1", "1.node", {**me, "kind": "job"}, wait=10)       # the job itself is not a run
    a.add("r3", "2.node", {**me, "kind": "run"}, wait=10)
    assert (runs.held("1.node"), runs.held("2.node")) == (2, 1)
    info = a.take("r1", "1.node", os.getpid(), os.getuid())
    assert runs.held("1.node") == 2                             # the reattached session holds it now
    a.release_run("1.node", info)
    assert runs.held("1.node") == 1
    a.forget_job("2.node")
    assert runs.held("2.node") == 0
    now[0] = 111.0
    a.expire()                                                  # r2's client never came back
    assert runs.held("1.node") == 0
