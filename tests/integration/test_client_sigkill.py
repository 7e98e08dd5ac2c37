"""A SIGKILLed C client still gets its container removed: the daemon sees the connection close.

The proof is the engine's own ``destroy`` event for the job's container, waited for (no time limit in
the assertion), then the engine's listing. Both C clients: the job starter (pbs_mom's SIGKILL, a crash)
and ``cbatch-client run`` inside a job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from torque_helpers import job_containers, script

IMG = "cbatch-test/busybox:1"


def _destroy_watch(cid: str, since: float) -> subprocess.Popen:
    return subprocess.Popen(["docker", "events", "--since", f"{since:.3f}", "--filter", f"container={cid}",
                             "--filter", "event=destroy", "--format", "{{.Action}} {{.Actor.ID}}"],
                            stdout=subprocess.PIPE, text=True)


def _wait_destroyed(watch: subprocess.Popen, cid: str) -> str:
    """The destroy event's line (blocks until the engine reports it; the test run's timeout is the bound)."""
    try:
        line = watch.stdout.readline()
    finally:
        watch.kill()
        watch.wait()
    return line.strip()


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
    watch = _destroy_watch(cid, time.time() - 1)
    job.kill_starter(signal.SIGKILL)
    assert _wait_destroyed(watch, cid) == f"destroy {cid}"
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
    watch = _destroy_watch(cid, time.time() - 1)
    os.kill(pid, signal.SIGKILL)
    assert _wait_destroyed(watch, cid) == f"destroy {cid}"
    assert not job_containers(daemon.instance, job.job_id)
    r = job.wait(120)
    assert r.stdout.decode().splitlines()[-1] == "rc=137", r.stdout
