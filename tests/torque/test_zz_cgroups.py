"""TORQUE built with --enable-cgroups (scripts/torque-up --cgroups, /opt/torque-cg): the container is nested
under the job's cgroup in every controller TORQUE uses, so the job's memory limit and cpuset hold and
pbs_mom's cput counts the container's work (its mem does not: see test_resources_used_of_a_busy_container_job);
nothing is left behind. These run last (one switch)."""

from __future__ import annotations

import glob
import os

import pytest

from torque_helpers import container_cgroup
from trq import cpu_spin, instance_containers, wait_until

TORQUE_CONTROLLERS = ("cpuacct", "cpuset", "memory", "devices")
CG = "/sys/fs/cgroup"


@pytest.fixture
def wd(torque_cg, alice):
    path = torque_cg.workdir(alice)
    yield path
    torque_cg.cleanup(path)


def _spool(t, job_id):
    try:
        with open(os.path.join(t.home, "spool", f"{job_id}.OU"), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def _leftovers(job_id):
    return [p for p in glob.glob(f"{CG}/*/torque/{job_id}") + glob.glob(f"{CG}/*/*/torque/{job_id}")]


def test_container_nested_in_every_torque_controller(torque_cg, cbatchd, alice, wd):
    t = torque_cg
    job = t.qsub(alice, "#!/bin/bash\necho ready\nsleep 300\n", ["-q", "short", "-l", "nodes=1:ppn=1,mem=200mb"], wd)
    assert wait_until(lambda: b"ready" in _spool(t, job), 120), (t.qstat(job), cbatchd.log())
    (cid,) = instance_containers(cbatchd.instance, job)
    try:
        parent, leaf = container_cgroup(cid)
        assert parent == f"/torque/{job}"
        # Every controller pbs_mom was told about (PBS_HOME/trq-cgroup-paths, written by torque-up --cgroups).
        with open(os.path.join(t.home, "trq-cgroup-paths")) as fh:
            controllers = dict(line.split() for line in fh if line.strip())
        assert set(TORQUE_CONTROLLERS) <= set(controllers)
        for c, mount in controllers.items():
            assert os.path.isdir(f"{mount}/torque/{job}"), f"{c}: pbs_mom made no /torque/{job}"
            assert os.path.isdir(f"{mount}/torque/{job}/{leaf}"), f"{c}: container not under /torque/{job}"
        with open(f"{CG}/memory/torque/{job}/memory.limit_in_bytes") as fh:
            assert int(fh.read()) == 200 << 20
        with open(f"{CG}/cpuset/torque/{job}/cpuset.cpus") as fh, open(f"{CG}/cpuset/torque/{job}/{leaf}/cpuset.cpus") as gh:
            job_cpus, ctr_cpus = fh.read().strip(), gh.read().strip()
        assert job_cpus and ctr_cpus == job_cpus, (job_cpus, ctr_cpus)
    finally:
        t.qdel(alice, job)
    t.wait(job)
    assert not instance_containers(cbatchd.instance, job)
    assert wait_until(lambda: not _leftovers(job), 30), _leftovers(job)


def test_mem_limit_oom_line(torque_cg, cbatchd, alice, wd):
    """mem=100mb is the job cgroup's limit, which holds for the nested container: the script's last command
    is OOM-killed (137) and cbatch adds one line saying so (the batch system cannot see OOM otherwise)."""
    t = torque_cg
    job = t.qsub(alice, "#!/bin/bash\necho start\nhead -c 400m /dev/zero | tail > /dev/null\n",
                 ["-q", "short", "-l", "nodes=1:ppn=1,mem=100mb"], wd)
    r = t.wait(job)
    ours = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("cbatch: ")]
    assert r.stdout == b"start\n" and r.exit_status == 137, (r.attrs, r.stderr)
    assert ours == [f"cbatch: job {job}: killed: out of memory: limit 100 MiB (request more with qsub -l mem=...)"], \
        r.stderr
    assert not instance_containers(cbatchd.instance, job)
    assert wait_until(lambda: not _leftovers(job), 30), _leftovers(job)


def _memory_stat(job_id) -> dict:
    try:
        with open(f"{CG}/memory/torque/{job_id}/memory.stat") as fh:
            return {k: int(v) for k, v in (line.split() for line in fh)}
    except FileNotFoundError:
        return {}


def test_resources_used_of_a_busy_container_job(torque_cg, cbatchd, alice, wd):
    """pbs_mom's cput is the job cgroup's cpuacct.usage, which counts the nested container's CPU. Its mem is
    the job cgroup's own ``rss`` line of memory.stat (mom_mach.c, not ``total_rss``): in cgroup v1 the pages of
    a nested container are charged to the container's cgroup, so resources_used.mem leaves them out (it was
    asserted non-zero here, which only the starter's own pages made true, and only when one of the mom's
    5-second polls fell inside the job: flaky, and not about the container). What holds is the job's limit
    over the container's pages (test_mem_limit_oom_line) and the job cgroup's hierarchical total, seen here
    while the container holds 60 MiB."""
    t = torque_cg
    job = t.qsub(alice, "#!/bin/bash\n{ head -c 60m /dev/zero; sleep 3; } | tail > /dev/null & \n"
                 f"{cpu_spin(3)}; wait; echo done\n",
                 ["-q", "short", "-l", "nodes=1:ppn=1,mem=500mb"], wd)
    held = wait_until(lambda: (lambda st: st if st.get("total_rss", 0) >= 50 << 20 else None)(_memory_stat(job)),
                      120, interval=0.05)
    assert held is not None, (t.qstat(job), cbatchd.log()[-2000:])    # the moment: the container holds its 60 MiB
    assert held["rss"] < 16 << 20, held          # charged to the container's own cgroup, not the job's
    r = t.wait(job)
    assert (r.exit_status, r.stdout) == (0, b"done\n"), (r.attrs, r.stderr)
    h, m, s = (int(x) for x in r.attrs["resources_used.cput"].split(":"))
    assert h * 3600 + m * 60 + s >= 2, r.attrs
    assert wait_until(lambda: not _leftovers(job), 30), _leftovers(job)
