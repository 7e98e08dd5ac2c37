"""OpenPBS with its shipped pbs_cgroups hook (scripts/openpbs-up --cgroups): the container nests under the
job's cgroup ``pbs_jobs.service/jobid/<id>``, so the job's memory limit holds, the OOM line is cbatch's one
line, and ``resources_used`` counts the container. These run last (the hook stays on until the end)."""

from __future__ import annotations

import glob
import os

import pytest

from torque_helpers import container_cgroup
from trq import cpu_spin, instance_containers, wait_until

CG = "/sys/fs/cgroup"


@pytest.fixture
def wd(pbs_cg, alice):
    path = pbs_cg.workdir(alice)
    yield path
    pbs_cg.cleanup(path)


def _spool(job_id):
    try:
        with open(f"/var/spool/pbs/spool/{job_id}.OU", "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def _leftovers(job_id):
    return glob.glob(f"{CG}/*/pbs_jobs.service/jobid/{job_id}")


def test_container_nested_in_the_pbs_job_cgroup(pbs_cg, cbatchd, alice, wd):
    job = pbs_cg.qsub(alice, "#!/bin/bash\necho ready\nsleep 300\n",
                      ["-q", "short", "-l", "select=1:ncpus=1:mem=200mb"], wd)
    assert wait_until(lambda: b"ready" in _spool(job), 120), (pbs_cg.qstat(job), cbatchd.log()[-3000:])
    (cid,) = instance_containers(cbatchd.instance, job)
    try:
        parent, leaf = container_cgroup(cid)
        assert parent == f"/pbs_jobs.service/jobid/{job}"
        assert os.path.isdir(f"{CG}/memory/pbs_jobs.service/jobid/{job}/{leaf}")
        with open(f"{CG}/memory/pbs_jobs.service/jobid/{job}/memory.limit_in_bytes") as fh:
            assert int(fh.read()) == 200 << 20
    finally:
        pbs_cg.qdel(alice, job)
    pbs_cg.wait(job)
    assert not instance_containers(cbatchd.instance, job)
    assert wait_until(lambda: not _leftovers(job), 30), _leftovers(job)


def test_mem_limit_oom_line(pbs_cg, cbatchd, alice, wd):
    job = pbs_cg.qsub(alice, "#!/bin/bash\necho start\nhead -c 400m /dev/zero | tail > /dev/null\necho $?\n",
                      ["-q", "short", "-l", "select=1:ncpus=1:mem=100mb"], wd)
    r = pbs_cg.wait(job)
    ours = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("cbatch: ")]
    assert r.stdout == b"start\n137\n" and r.exit_status == 0, (r.attrs, r.stderr)
    assert len(ours) == 1 and "out of memory" in ours[0] and "100 MiB" in ours[0], r.stderr
    assert not instance_containers(cbatchd.instance, job)


def test_resources_used_counts_the_container(pbs_cg, cbatchd, alice, wd):
    job = pbs_cg.qsub(alice, f"#!/bin/bash\n{cpu_spin(3)}; echo done\n", ["-q", "short", "-l", "select=1:ncpus=1:mem=300mb"], wd)
    r = pbs_cg.wait(job)
    assert (r.exit_status, r.stdout) == (0, b"done\n"), (r.attrs, r.stderr)
    h, m, s = (int(x) for x in r.attrs["resources_used"]["cput"].split(":"))
    assert h * 3600 + m * 60 + s >= 2, r.attrs["resources_used"]
