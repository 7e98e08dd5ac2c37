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
