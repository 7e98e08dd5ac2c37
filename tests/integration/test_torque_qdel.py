"""End-to-end 5: qdel and a lost starter stop and remove the container, as the real mom's signals would."""

from __future__ import annotations

import signal
import time

import pytest

from torque_helpers import job_containers, run_epilogue, script, wait_until


@pytest.fixture
def bare_mom(mom_factory, daemon):
    """A mom that never runs the epilogue: whatever is left when the starter exits stays visible."""
    return mom_factory(daemon, run_epilogue=False)


def test_qdel_terms_then_kills_container_before_kill_delay(bare_mom, daemon, alice, workdir):
    kill_delay = 8.0
    job = bare_mom.submit(script("""
trap 'echo got-term > marker; sleep 30; echo survived > marker2' TERM
echo ready
sleep 120 &
wait
echo after-wait
"""), alice.name, initdir=str(workdir), kill_delay=kill_delay)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    assert job_containers(daemon.instance, job.job_id), "the job should run in a container"
    t0 = time.monotonic()
    job.qdel()
    r = job.wait(60)
    # The starter exited on its own (re-raising SIGTERM), well before the mom's SIGKILL at kill_delay.
    assert r.exit_status == 271, (r.stdout, r.stderr)
    assert r.ended_at - t0 < kill_delay - 1.0
    # Nothing removed the container after the starter exited (no epilogue): it was gone before.
    assert not job_containers(daemon.instance, job.job_id)
    assert (workdir / "marker").read_text() == "got-term\n"       # the container got SIGTERM first
    assert not (workdir / "marker2").exists()                      # ...and SIGKILL during the trap's sleep
    assert b"after-wait" not in r.stdout
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0


def test_starter_sigkilled_daemon_removes_container(bare_mom, daemon, alice):
    job = bare_mom.submit(script("echo ready; sleep 120"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    assert job_containers(daemon.instance, job.job_id)
    job.kill_starter(signal.SIGKILL)
    t0 = time.monotonic()
    took = wait_until(lambda: not job_containers(daemon.instance, job.job_id), timeout=10)
    assert took is not None, "container still there 10 s after its starter died"
    assert time.monotonic() - t0 < 3.0 and took <= 2.5, f"container removed only after {took:.2f}s"
    r = job.wait(30)
    assert r.exit_status == 265
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0


def test_qdel_native_job(mom, alice):
    job = mom.submit(script("echo ready; sleep 120", image=None), alice.name, queue="native")
    assert job.wait_output(b"ready\n", timeout=60)
    job.qdel()
    r = job.wait(30)
    assert r.exit_status in (271, 143)      # the shell may die of the TERM (271) or trap-less exit 143
