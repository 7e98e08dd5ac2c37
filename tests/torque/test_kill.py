"""qdel and walltime on the real pbs_mom: the container must go with the job (the mom itself never touches
containers: they are children of dockerd, in another session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trq import instance_containers, wait_until


@pytest.fixture
def wd(torque, alice):
    path = torque.workdir(alice)
    yield path
    torque.cleanup(path)


def _spool(torque, job_id, ext="OU") -> bytes:
    try:
        with open(os.path.join(torque.home, "spool", f"{job_id}.{ext}"), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def _running_container(torque, cbatchd, job_id):
    """Wait until the job's script printed 'ready' inside its container; return the container ids."""
    assert wait_until(lambda: b"ready" in _spool(torque, job_id), 120), (torque.qstat(job_id), cbatchd.log())
    ids = instance_containers(cbatchd.instance, job_id)
    assert ids, "the job printed ready but has no container"
    return ids


def test_qdel_removes_the_running_container(torque, cbatchd, alice, wd):
    job = torque.qsub(alice, "#!/bin/bash\ntest -e /.cbatch && echo ready\nsleep 300\necho not-reached\n",
                      ["-q", "short"], wd)
    _running_container(torque, cbatchd, job)
    torque.qdel(alice, job)
    r = torque.wait(job)
    # 271, not 265: the starter ended of qdel's SIGTERM (after the daemon stopped the container), before the
    # mom's SIGKILL at kill_delay; the daemon stopped the container on that SIGTERM, and it is gone (60 s
    # only bounds the wait).
    assert r.exit_status == 271, (r.attrs, r.stderr)
    assert r.stdout == b"ready\n"
    log = Path(cbatchd.log_path).read_text(errors="replace")
    assert any(f"job {job}: SIGTERM: stopping container" in ln for ln in log.splitlines()), log[-3000:]
    assert wait_until(lambda: not instance_containers(cbatchd.instance, job), 60), \
        f"container of {job} still there after the job ended"


def test_qdel_native_job_271(torque, alice, wd):
    job = torque.qsub(alice, "#!/bin/bash\necho ready\nsleep 300\n", [], wd)
    assert wait_until(lambda: b"ready" in _spool(torque, job), 60)
    torque.qdel(alice, job)
    r = torque.wait(job)
    assert (r.exit_status, r.stdout) == (271, b"ready\n"), r.attrs


def test_walltime_kill_removes_the_container(torque, cbatchd, alice, wd):
    """walltime=5 with the mom's $check_poll_time 5: killed at a poll, the .e names the limit."""
    job = torque.qsub(alice, "#!/bin/bash\ntest -e /.cbatch && echo ready\nsleep 300\n",
                      ["-q", "short", "-l", "walltime=00:00:05"], wd)
    _running_container(torque, cbatchd, job)
    r = torque.wait(job, timeout=120)
    assert b"job killed: walltime" in r.stderr, (r.attrs, r.stderr)
    # TORQUE 6.1 records a walltime kill as JOB_EXEC_KILL_WALLTIME (-11), whatever the starter exits with.
    assert r.exit_status == -11, r.attrs
    assert not instance_containers(cbatchd.instance, job)
