"""End-to-end 5: qdel and a lost starter stop and remove the container, as the real mom's signals would."""

from __future__ import annotations

import os
import signal
import time

import docker
import pytest

from cbatch.clients import client
from torque_helpers import container_events, job_containers, run_epilogue, script, wait_until


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
    (cid,) = job_containers(daemon.instance, job.job_id)
    since = time.time() - 1
    job.qdel()
    r = job.wait(60)
    # The starter exited on its own (re-raising SIGTERM): the mom never needed its SIGKILL at kill_delay.
    assert r.exit_status == 271, (r.stdout, r.stderr)
    assert not r.kill_delay_killed
    # Nothing removed the container after the starter exited (no epilogue): it was gone before.
    assert not job_containers(daemon.instance, job.job_id)
    # The engine's record: SIGTERM first (then SIGKILL if anything outlived the grace), then death.
    # The script's trap may or may not get to write its marker: as under a real mom, the outer shell dies of
    # the same SIGTERM at once and takes the job (the container) down within milliseconds.
    events = container_events(cid, since)
    kills = [e["signal"] for e in events if e["action"] == "kill"]
    assert kills and kills[0] == "15", events
    assert set(kills) <= {"15", "9"}, events
    assert any(e["action"] == "die" for e in events), events
    assert not (workdir / "marker2").exists()                      # nothing outlived the stop
    assert b"after-wait" not in r.stdout
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0


def test_starter_sigkilled_daemon_removes_container(bare_mom, daemon, alice):
    job = bare_mom.submit(script("echo ready; sleep 120"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    assert job_containers(daemon.instance, job.job_id)
    job.kill_starter(signal.SIGKILL)
    # The script sleeps 120 s: a container gone within the wait's bound (only a bound) did not end by
    # itself; the daemon killed it because its client went away, and says so.
    took = wait_until(lambda: not job_containers(daemon.instance, job.job_id), timeout=60)
    assert took is not None, "container still there 60 s after its starter died"
    assert any(f"job {job.job_id}: container " in ln and "went away" in ln and "killing it" in ln
               for ln in daemon.log().splitlines()), daemon.log()[-3000:]
    r = job.wait(30)
    assert r.exit_status == 265
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0


def test_qdel_native_job(mom, alice):
    job = mom.submit(script("echo ready; sleep 120", image=None), alice.name, queue="native")
    assert job.wait_output(b"ready\n", timeout=60)
    job.qdel()
    r = job.wait(30)
    assert r.exit_status == 271             # the shell is the starter here: it dies of the SIGTERM


def test_walltime_exceeded_stops_container(mom, daemon, alice):
    job = mom.submit(script("echo ready; sleep 120"), alice.name, resources="nodes=1:ppn=1,walltime=00:00:06",
                     walltime_poll=1.0, kill_delay=5.0)
    assert job.wait_output(b"ready\n", timeout=5), job.peek()
    r = job.wait(60)
    assert r.walltime_killed
    assert r.exit_status == 271, r.stderr
    assert r.stdout == b"ready\n"
    assert b"=>> PBS: job killed: walltime" in r.stderr and b"exceeded limit 6" in r.stderr
    assert not job_containers(daemon.instance, job.job_id)


def _phase(api, daemon, job) -> str:
    """Where the job's start is, from what can be observed: ``submitted`` (not registered yet),
    ``registered`` (no container yet), ``container`` (it exists, the script printed nothing), ``running``."""
    if job.peek()[0]:
        return "running"
    if job_containers(daemon.instance, job.job_id):
        return "container"
    if any(j["job_id"] == job.job_id for j in client.call(daemon.socket, "status")["jobs"]):
        return "registered"
    return "submitted"


# The starter the "registered" phase runs: it says it is waiting, then waits for the test before it execs the
# real one. So the phase is held, not hoped for: the prologue has registered the job, no start was asked.
HELD_STARTER = """#!/bin/sh
: > "{waiting}"
while [ ! -e "{go}" ]; do sleep 0.05; done
exec "{real}" "$@"
"""


@pytest.mark.parametrize("phase", ["registered", "container", "running"])
def test_qdel_during_start_leaves_nothing(bare_mom, daemon, alice, workdir, phase):
    """qdel once the prologue registered the job (the starter held before it asks for a start), once the
    container exists, once the script runs: nothing may survive, even without the epilogue's clean-up (the
    daemon alone must stop what it started). The test proves the phase the qdel hit: it was observed right
    before the qdel (the first one is held there; the direct engine's start is now too quick, ~10 ms from the
    request to its bundle, for a poll to catch a start in flight before the container exists)."""
    api = docker.APIClient(base_url=os.environ.get("CBATCH_ENGINE_URL", "unix:///var/run/docker.sock"))
    real_starter = bare_mom.starter
    waiting, go = workdir / "starter-waiting", workdir / "starter-go"
    if phase == "registered":
        held = workdir / "held-starter"
        held.write_text(HELD_STARTER.format(waiting=waiting, go=go, real=real_starter))
        os.chmod(held, 0o755)
        bare_mom.starter = str(held)
    try:
        job = bare_mom.submit(script("sleep 1; echo ready; sleep 120"), alice.name, kill_delay=3.0)
    finally:
        bare_mom.starter = real_starter
    seen = []

    def at_phase() -> bool:
        if phase == "registered" and not waiting.exists():
            return False
        seen.append(_phase(api, daemon, job))
        return seen[-1] == phase
    assert wait_until(at_phase, timeout=60, interval=0.002) is not None, f"phase {phase} never seen: {seen}"
    job.qdel()
    r = job.wait(60)
    assert r.exit_status in (271, 265), (phase, r.exit_status, r.stdout, r.stderr)
    assert (r.stdout == b"") == (phase != "running"), (phase, r.stdout)
    assert wait_until(lambda: not job_containers(daemon.instance, job.job_id), timeout=5) is not None, \
        f"container of {job.job_id} left after qdel in phase {phase}"
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0


def test_qdel_sigkill_after_stop_grace_when_term_is_ignored(bare_mom, daemon, alice, workdir):
    """A job whose shells survive SIGTERM (BASH_ENV traps it, as it would under plain TORQUE): the daemon
    must SIGKILL the container after daemon.stop_grace, and the starter must still exit before kill_delay."""
    env_file = workdir / "env.sh"
    env_file.write_text("trap 'echo term-$$ >> marker' TERM\n")
    os.chown(env_file, alice.uid, alice.gid)
    kill_delay = 8.0
    job = bare_mom.submit(script("echo ready; while :; do sleep 0.2; done"), alice.name, initdir=str(workdir),
                          variables={"BASH_ENV": str(env_file)}, kill_delay=kill_delay)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    (cid,) = job_containers(daemon.instance, job.job_id)
    since = time.time() - 1
    job.qdel()
    r = job.wait(60)
    assert r.exit_status == 271, (r.stdout, r.stderr)
    assert not r.kill_delay_killed          # the daemon's SIGKILL ended it, not the mom's at kill_delay
    assert not job_containers(daemon.instance, job.job_id)
    kills = [e["signal"] for e in container_events(cid, since) if e["action"] == "kill"]
    assert kills[:1] == ["15"] and "9" in kills, kills
    # The script's shell ran its trap; the outer shell defers its own until its foreground child ends.
    assert (workdir / "marker").read_text().startswith("term-")
    assert run_epilogue(bare_mom, job, r.exit_status).returncode == 0
