"""End-to-end 6: the job's cgroup (TORQUE --enable-cgroups) or cbatch's own limits hold the container."""

from __future__ import annotations

import pytest

from cbatch.host import cgroups
from torque_helpers import cbatch_lines, direct_config, docker_inspect, job_containers, script

MiB = 1 << 20


def test_container_nested_in_torque_cgroup(mom, alice):
    job = mom.submit(script("cat /proc/self/cgroup"), alice.name,
                     resources="nodes=1:ppn=1,walltime=00:05:00,mem=256mb", cgroups=True)
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    lines = {l.split(":", 2)[1]: l.split(":", 2)[2] for l in r.stdout.decode().splitlines() if l.count(":") >= 2}
    for ctl in ("memory", "cpuset"):
        assert lines[ctl].startswith(f"/torque/{job.job_id}/"), lines
    assert not cgroups.existing(f"/torque/{job.job_id}"), "cgroup directories left after the job"
    assert not r.cgroup_leftovers


def test_limits_from_resources_without_batch_cgroups(mom, daemon, alice, workdir):
    job = mom.submit(script("echo ready; while [ ! -e go ]; do sleep 0.1; done"), alice.name,
                     initdir=str(workdir), resources="nodes=1:ppn=2,walltime=00:05:00,mem=256mb")
    try:
        assert job.wait_output(b"ready\n", timeout=60), job.peek()
        (cid,) = job_containers(daemon.instance, job.job_id)
        if cid.startswith("direct-"):
            # The same limits in the direct engine's OCI config, in Docker's terms.
            oci = direct_config(cid)["linux"]
            res = oci["resources"]
            cpu = res.get("cpu") or {}
            host = {"Memory": res["memory"]["limit"], "CpusetCpus": cpu.get("cpus"),
                    "NanoCpus": cpu["quota"] * 10 ** 9 // cpu["period"] if cpu.get("quota") else None,
                    "CgroupParent": None if oci["cgroupsPath"].startswith("/cbatch/") else oci["cgroupsPath"]}
        else:
            host = docker_inspect(cid)["HostConfig"]
    finally:
        (workdir / "go").touch()
    r = job.wait(60)
    assert r.exit_status == 0, r.stderr
    assert host["Memory"] == 256 * MiB
    cpus_by_quota = host.get("NanoCpus") == 2 * 10 ** 9
    cpus_by_set = host.get("CpusetCpus") and len(cgroups_cpu_list(host["CpusetCpus"])) == 2
    assert cpus_by_quota or cpus_by_set, host
    assert not host.get("CgroupParent")


def cgroups_cpu_list(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_oom_is_137_with_one_line(mom, daemon, alice):
    job = mom.submit(script('echo start; x=$(head -c 400m /dev/zero | tr "\\0" a); echo survived ${#x}'),
                     alice.name, resources="nodes=1:ppn=1,walltime=00:05:00,mem=64mb")
    r = job.wait(120)
    assert r.exit_status == 137, (r.stdout, r.stderr)
    assert b"survived" not in r.stdout
    oom = [l for l in cbatch_lines(r.stderr) if "out of memory" in l]
    assert len(oom) == 1, r.stderr
    assert not job_containers(daemon.instance, job.job_id)


def test_oom_under_torque_cgroup_and_tidy(mom, alice):
    job = mom.submit(script('x=$(head -c 400m /dev/zero | tr "\\0" a); echo survived'), alice.name,
                     resources="nodes=1:ppn=1,walltime=00:05:00,mem=64mb", cgroups=True)
    r = job.wait(120)
    assert r.exit_status == 137, (r.stdout, r.stderr)
    assert not cgroups.existing(f"/torque/{job.job_id}")


@pytest.mark.parametrize("mem", ["2mb", "6mb"])
def test_tiny_mem_job_still_starts(mom, alice, mem):
    """pbs_mom sets RLIMIT_DATA=mem on the starter: the static C starter starts under it (the Python one
    cannot below ~8 MB: MemoryError or SIGSEGV) and the job runs as under plain TORQUE, no $ignmem."""
    if mom.client is None:
        pytest.xfail("the Python starter cannot start under RLIMIT_DATA below ~8 MB (CBATCH_TEST_HOOKS=python)")
    assert mom.client and open(mom.starter).readline().startswith(f"#!{mom.client} shim")
    r = mom.submit(script("echo hi", image=None), alice.name, queue="native",
                   resources=f"nodes=1:ppn=1,mem={mem}").wait(60)
    assert (r.exit_status, r.stdout) == (0, b"hi\n"), r.stderr[-300:]
