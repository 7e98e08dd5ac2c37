"""A SIGKILLed C client still gets its container removed: the daemon sees the connection close.

The proof is the engine's own ``destroy`` event for the job's container (Docker's event stream or the
direct engine's record), waited for (bounded against a hang only), then the engine's listing. Both C clients: the job starter (pbs_mom's SIGKILL, a crash)
and ``cbatch-client run`` inside a job.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from torque_helpers import container_events, job_containers, script, wait_until

IMG = "cbatch-test/busybox:1"


def _destroyed(cid: str, since: float) -> bool:
    """The engine (Docker's event stream or the direct engine's own record) reported ``destroy`` for ``cid``."""
    return any(e["action"] == "destroy" for e in container_events(cid, since))


@pytest.fixture
def c_mom(mom):
    if mom.client is None:
        pytest.skip("the emulator runs the Python client (CBATCH_TEST_HOOKS=python or no C client built)")
    assert open(mom.starter).readline().startswith(f"#!{mom.client} shim")
    return mom


def test_sigkilled_c_starter_loses_its_container(c_mom, daemon, alice):
    job = c_mom.submit(script("echo ready; exec sleep 300"), alice.name)
    assert job.wait_output(b"ready", timeout=120), job.peek()
    (cid,) = job_containers(daemon.instance, job.job_id)
    since = time.time() - 1
    job.kill_starter(signal.SIGKILL)
    # A bound against a hang, not a speed target (that is the bench's).
    assert wait_until(lambda: _destroyed(cid, since), timeout=120) is not None, container_events(cid, since)
    assert not job_containers(daemon.instance, job.job_id)
    r = job.wait(120)
    assert r.exit_status == 265, (r.exit_status, r.stderr)       # TORQUE's "killed by SIGKILL" (256+9)


def test_sigkilled_c_run_loses_its_container(c_mom, daemon, alice):
    job = c_mom.submit(script(f"""
{c_mom.client} run --image {IMG} sh -c 'echo ready; exec sleep 300' &
pid=$!
echo pid=$pid
wait $pid
echo rc=$?
""", image=None), alice.name, variables={"CBATCH_SOCKET": daemon.socket})
    assert job.wait_output(b"ready", timeout=120), job.peek()
    pid = int(re.search(rb"pid=(\d+)", job.peek()[0]).group(1))
    (cid,) = job_containers(daemon.instance, job.job_id)
    since = time.time() - 1
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _destroyed(cid, since), timeout=120) is not None, container_events(cid, since)
    assert not job_containers(daemon.instance, job.job_id)
    r = job.wait(120)
    assert r.stdout.decode().splitlines()[-1] == "rc=137", r.stdout
