"""cbatch.daemon.limits: the connection gate and the per-key counters (pure bookkeeping)."""

from __future__ import annotations

import pytest

from cbatch.core.errors import DaemonError, JobError
from cbatch.daemon import limits


def test_per_user_cap_and_release():
    gate = limits.ConnectionGate(total=100, per_user=2)
    a, b = gate.admit(1000, lambda uid: False), gate.admit(1000, lambda uid: False)
    with pytest.raises(DaemonError) as exc:
        gate.admit(1000, lambda uid: False)
    assert exc.value.message == ("cbatch: daemon: busy: uid 1000 has 2 connections open "
                                 "(limit 2, key daemon.max_connections_per_user)")
    gate.release(a)
    gate.release(gate.admit(1000, lambda uid: False))
    gate.release(b)
    assert gate.count() == 0


def test_shared_pool_full_still_admits_root_and_users_with_a_job():
    gate = limits.ConnectionGate(total=3, per_user=10)
    held = [gate.admit(2000, lambda uid: False) for _ in range(3)]
    with pytest.raises(DaemonError) as exc:
        gate.admit(2001, lambda uid: False)
    assert "key daemon.max_connections" in exc.value.message
    root = [gate.admit(0, lambda uid: False) for _ in range(50)]
    job_user = gate.admit(3000, lambda uid: uid == 3000)
    for t in held + root + [job_user]:
        gate.release(t)
    assert gate.count() == 0
    gate.release(gate.admit(2001, lambda uid: False))     # the pool is free again


def test_counter_refuses_at_limit_and_gives_back():
    c = limits.Counter()
    refuse = limits.run_refusal("7.node", 2)
    c.take("7.node", 2, refuse)
    with c.holding("7.node", 2, refuse):
        with pytest.raises(JobError) as exc:
            c.take("7.node", 2, refuse)
        assert exc.value.message == ("cbatch: run: too many containers for job 7.node: 2 running "
                                     "(limit 2, key daemon.max_run_containers)")
    assert c.held("7.node") == 1
    c.give("7.node")
    assert c.held("7.node") == 0


@pytest.mark.parametrize("configured, cpus, limit", [(0, None, 1), (0, 0, 1), (0, 8, 8), (3, 8, 3), (5, None, 5)])
def test_run_limit(configured, cpus, limit):
    assert limits.run_limit(configured, cpus) == limit


def test_promoted_session_connections_stop_counting():
    gate = limits.ConnectionGate(total=100, per_user=1)
    t = gate.admit(1000, lambda uid: True)
    gate.promote(t)                          # it became a running container's session
    t2 = gate.admit(1000, lambda uid: True)  # the user can still connect (cbatch run, another job)
    gate.release(t)                          # the session's end: nothing more to give back
    assert gate.count(1000) == 1
    gate.release(t2)
    gate.release(t2)                         # idempotent
    assert gate.count() == 0


def test_pending_waits_for_a_slot_then_refuses():
    import threading
    c = limits.Counter()
    refuse = limits.pending_refusal("start", 1000, 1)
    c.take(1000, 1, refuse)
    threading.Timer(0.2, c.give, args=(1000,)).start()
    c.take(1000, 1, refuse, wait=30)         # got the slot given back meanwhile
    with pytest.raises(DaemonError) as exc:
        c.take(1000, 1, refuse, wait=0.1)
    assert exc.value.message.startswith("cbatch: start: too many requests in progress: uid 1000: 1 (limit 1, ")


RAISE = """
import logging, resource, sys
from cbatch.daemon import limits
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
print("soft", limits.raise_fd_limit(int(sys.argv[3])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("soft, hard, conns, warned", [(1024, 4096, 1024, True), (1024, 20000, 1024, False),
                                                       (20000, 20000, 1024, False), (512, 512, 64, True)])
def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(soft, hard, conns, warned):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", RAISE, str(soft), str(hard), str(conns)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[-1] == f"soft {hard} {hard}"
    assert any("raise LimitNOFILE" in ln for ln in out[:-1]) is warned, out
