"""cbatchd stopped (SIGTERM) for longer than the starters used to wait (15 s), then back (issue #10.12).

Before: the starter gave up after 15 s and printed "the job's container was stopped" while the container
still ran; the job ended 125 without its output. Now the starter keeps waiting (bounded: client.REATTACH_FOR)
and the job keeps its own status and output. A starter that is gone when the daemon returns has its
container removed by the daemon's start-up recovery.
"""

from __future__ import annotations

import signal
import time

import pytest

from torque_helpers import cbatch_lines, job_containers, script, wait_until

pytestmark = [pytest.mark.root, pytest.mark.docker]
OLD_REATTACH_FOR = 15.0


def test_job_survives_a_daemon_down_longer_than_15s(daemon_factory, mom_factory, alice):
    d = daemon_factory("down-long")
    m = mom_factory(d)
    job = m.submit(script("echo ready; sleep 25; echo bye; exit 5"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    d.stop(sig=signal.SIGTERM)
    assert job_containers(d.instance, job.job_id), "SIGTERM must leave the container running"
    time.sleep(OLD_REATTACH_FOR + 3)        # past the old give-up point; the moment is checked next
    assert not job.done, "the starter gave up while its container still ran"
    d.start()
    r = job.wait(120)
    assert (r.exit_status, r.stdout) == (5, b"ready\nbye\n"), (r.exit_status, r.stdout, r.stderr)
    assert cbatch_lines(r.stderr) == [], r.stderr
    assert wait_until(lambda: not job_containers(d.instance, job.job_id), 15) is not None


def test_daemon_back_removes_containers_of_gone_starters(daemon_factory, mom_factory, alice):
    d = daemon_factory("down-gone")
    m = mom_factory(d, run_epilogue=False)
    job = m.submit(script("echo ready; sleep 300"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    d.stop(sig=signal.SIGTERM)
    job.kill_starter(signal.SIGKILL)
    assert job.wait(60).exit_status == 265
    assert job_containers(d.instance, job.job_id), "nobody may have removed it while the daemon was down"
    d.start()
    assert wait_until(lambda: not job_containers(d.instance, job.job_id), 30) is not None, d.log()[-2000:]
