"""The site-facing pieces on the real TORQUE: the submit filter as the server's SUBMITFILTER (torque.cfg) and
cbatch's prologue/epilogue for jobs in native queues."""

from __future__ import annotations

import glob
import os
import re

import pytest

from trq import instance_containers

STATE_JOBS = "/run/cbatch-torque-test/state/jobs"


@pytest.fixture
def wd(torque, alice):
    path = torque.workdir(alice)
    yield path
    torque.cleanup(path)


def _registered(job_id):
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)
    return [p for p in glob.glob(os.path.join(STATE_JOBS, "*.json")) if os.path.basename(p).startswith(safe + "-")]


def test_submit_filter_rejects_at_qsub_time(torque, alice, wd):
    with open(os.path.join(torque.home, "torque.cfg")) as fh:
        assert fh.read().startswith("SUBMITFILTER ")
    r = torque.qsub_raw(alice, "#!/bin/bash\n#CBATCH --image=evil:1\necho ran\n", [], wd)
    err = r.stderr.decode()
    assert r.returncode != 0 and r.stdout == b"", (r.returncode, err)
    assert "cbatch: image: not allowed in queue batch: evil:1" in err, err
    r = torque.qsub_raw(alice, "#!/bin/bash\n#CBATCH --imagee=cbatch-test/debian:12\necho ran\n", ["-q", "short"], wd)
    assert r.returncode != 0 and b"cbatch: " in r.stderr, r.stderr


def test_submit_filter_passes_the_script_unchanged(torque, alice, wd):
    body = "#!/bin/bash\n#PBS -N filt\n#CBATCH --image=cbatch-test/debian:12\n# \xe9 comment\ncat \"$0\"\n"
    job = torque.qsub(alice, body, [], wd)
    r = torque.wait(job)
    assert (r.exit_status, r.stdout) == (0, body.encode()), r.stderr


def test_prologue_and_epilogue_run_for_native_jobs(torque, cbatchd, alice, wd):
    """A native job is registered by the prologue (so `cbatch run` inside it is authorised by its session)
    and unregistered by the epilogue (its registration file is gone and no container is left)."""
    cbatch = os.path.join(os.path.dirname(torque.libexec), "venv", "bin", "cbatch")
    job = torque.qsub(alice, f"#!/bin/bash\ntest -e /.cbatch || echo native\n"
                      f"{cbatch} run --image cbatch-test/busybox:1 sh -c 'echo in-run $(id -u)'\necho rc=$?\n", [], wd)
    r = torque.wait(job)
    assert r.exit_status == 0, (r.attrs, r.stderr)
    assert r.stdout.decode().splitlines() == ["native", f"in-run {alice.uid}", "rc=0"], r.stderr
    assert not _registered(job)
    assert not instance_containers(cbatchd.instance, job)
