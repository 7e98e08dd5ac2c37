"""A job's ``cput=`` holds its container on a TORQUE without cgroups (issue #10 item 5).

pbs_mom (and the emulator) only counts its session's processes, never the container's, so before cbatchd
enforced ``cput=`` itself the busy job below ran to the end and printed ``survived`` (checked on the old
code: status 0, no line). The loop counts are CPU work, not wall time: busybox's ``sh`` takes about 1.9 s of
CPU per million iterations here, whatever the load on the machine.
"""

from __future__ import annotations

import re

from torque_helpers import cbatch_lines, job_containers, script

BUSYBOX = "cbatch-test/busybox:1"


def burn(iterations: int) -> bytes:
    return script(f'echo start; i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done; echo survived; times',
                  image=BUSYBOX, shebang="#!/bin/sh")


def test_container_over_its_cput_is_stopped_with_one_line(mom, daemon, alice):
    # About 8 s of CPU against a 3 s limit.
    job = mom.submit(burn(4_000_000), alice.name, resources="nodes=1:ppn=1,walltime=00:10:00,cput=00:00:03")
    r = job.wait(600)
    assert b"start" in r.stdout and b"survived" not in r.stdout, (r.stdout, r.stderr)
    assert r.exit_status in (143, 137), (r.exit_status, r.stderr)        # SIGTERM (SIGKILL after the grace)
    lines = [l for l in cbatch_lines(r.stderr) if "cput limit exceeded" in l]
    assert len(lines) == 1, r.stderr
    m = re.fullmatch(rf"cbatch: job {re.escape(job.job_id)}: cput limit exceeded: (\d\d):(\d\d):(\d\d\.\d) > "
                     r"00:00:03 \(CPU time of all the container's processes; request more with qsub -l "
                     r"cput=HH:MM:SS\)", lines[0])
    assert m, lines[0]
    h, mi, s = (float(x) for x in m.groups())
    assert h * 3600 + mi * 60 + s > 3                       # the container's own CPU time, from its cgroup
    assert not job_containers(daemon.instance, job.job_id)


def test_container_under_its_cput_runs_to_the_end(mom, daemon, alice):
    # About 0.8 s of CPU against a 30 s limit.
    r = mom.submit(burn(400_000), alice.name, resources="nodes=1:ppn=1,walltime=00:10:00,cput=00:00:30").wait(600)
    assert r.exit_status == 0, r.stderr
    assert b"survived" in r.stdout
    assert not [l for l in cbatch_lines(r.stderr) if "cput" in l], r.stderr


def test_torque_cgroup_job_is_left_to_pbs_mom(mom, daemon, alice):
    """With a TORQUE job cgroup pbs_mom accounts the container and enforces cput itself (the emulator does
    not): cbatchd must not stop it a second time. About 2.5 s of CPU against a 1 s limit."""
    r = mom.submit(burn(1_300_000), alice.name, resources="nodes=1:ppn=1,walltime=00:10:00,cput=00:00:01",
                   cgroups=True).wait(600)
    assert r.exit_status == 0, r.stderr
    assert b"survived" in r.stdout
    user_s = float(r.stdout.decode().split("survived\n", 1)[1].split()[0].split("m")[1].rstrip("s"))
    assert user_s > 1.0, r.stdout                            # it really went over the limit
    assert not [l for l in cbatch_lines(r.stderr) if "cput" in l], r.stderr
