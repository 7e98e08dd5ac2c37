"""End-to-end: the job's process environment inside the container matches what pbs_mom gives a native job."""

from __future__ import annotations

import os

from torque_helpers import script

PROBE = """
umask
ulimit -c
ulimit -n
touch made-$PBS_JOBID
env -0 | sort -z | tr '\\0' '\\n' | grep -E '^(PBS_|HOME=|USER=|LOGNAME=|SHELL=|LANG=|ENVIRONMENT=|TMPDIR=)'
"""


def _run_both(mom, alice, workdir):
    out = {}
    for queue, image in (("native", None), ("batch", "cbatch-test/debian:12")):
        job = mom.submit(script(PROBE, image=image), alice.name, queue=queue, initdir=str(workdir),
                         resources="nodes=1:ppn=1,walltime=00:05:00,mem=100mb", tmpdir=True)
        r = job.wait(120)
        assert r.exit_status == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        mode = os.stat(workdir / f"made-{job.job_id}").st_mode & 0o777
        out[queue] = (job.job_id, lines[:3], mode, lines[3:])
    return out


def test_pbs_environment_is_the_same(mom, alice, workdir):
    out = _run_both(mom, alice, workdir)

    def norm(job_id, env):
        # Per-job values differ between the two jobs; replace them by placeholders.
        return [l.replace(job_id, "JOBID").split("=")[0] if l.startswith("PBS_JOBCOOKIE=") else
                l.replace(job_id, "JOBID") for l in env if not l.startswith(("PBS_QUEUE=", "PBS_O_QUEUE="))]

    native, contained = out["native"], out["batch"]
    assert norm(native[0], native[3]) == norm(contained[0], contained[3])
    assert native[1][1:] == contained[1][1:] == ["0", "20000"]        # core 0, nofile 20000 as pbs_mom sets


def test_umask_is_pbs_moms_0077(mom, alice, workdir):
    """pbs_mom starts the job with umask 0077: job files are private. A container must not widen that."""
    out = _run_both(mom, alice, workdir)
    assert out["native"][1][0] == "0077" and out["native"][2] == 0o600
    assert out["batch"][1][0] == "0077", "container umask differs from the starter's"
    assert out["batch"][2] == 0o600, oct(out["batch"][2])
