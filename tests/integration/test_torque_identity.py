"""End-to-end 1: the job runs as its user, inside the container, with the user's identity and home."""

from __future__ import annotations

import os

from torque_helpers import job_containers, script


def _lines(result):
    return dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)


def test_identity_matches_user(mom, daemon, alice):
    job = mom.submit(script("""
echo uid=$(id -u)
echo gid=$(id -g)
echo groups=$(id -G)
echo whoami=$(whoami)
echo home=$HOME
echo incontainer=$(test -e /.cbatch && echo yes || echo no)
"""), alice.name)
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    got = _lines(r)
    assert got["uid"] == str(alice.uid)
    assert got["gid"] == str(alice.gid)
    assert sorted(got["groups"].split()) == sorted(str(g) for g in alice.groups)
    assert got["whoami"] == alice.name
    assert got["home"] == alice.home
    assert got["incontainer"] == "yes"
    assert not job_containers(daemon.instance, job.job_id)


def test_files_written_are_owned_by_user(mom, daemon, alice, workdir):
    job = mom.submit(script("""
echo hello > out.txt
mkdir sub && touch sub/f
pwd
"""), alice.name, initdir=str(workdir), workdir=str(workdir))
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().strip() == str(workdir)
    for path in (workdir / "out.txt", workdir / "sub", workdir / "sub" / "f"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid), path
    assert (workdir / "out.txt").read_text() == "hello\n"


def test_bob_is_bob(mom, bob):
    r = mom.submit(script("id -un; id -u"), bob.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().split() == [bob.name, str(bob.uid)]


def test_run_privileged_starter_still_runs_job_as_user(mom_factory, daemon, alice, workdir):
    """$job_starter_run_privileged true: the starter starts as root and must drop to the job's owner."""
    m = mom_factory(daemon, run_privileged=True)
    for queue, image in (("batch", "cbatch-test/debian:12"), ("native", None)):
        job = m.submit(script("id -u; id -g; touch made-$PBS_JOBID", image=image), alice.name, queue=queue,
                       initdir=str(workdir))
        r = job.wait(120)
        assert r.exit_status == 0, (queue, r.stderr)
        assert r.stdout.decode().split() == [str(alice.uid), str(alice.gid)], queue
        st = os.stat(workdir / f"made-{job.job_id}")
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid)


def test_array_subjob_with_brackets_in_job_id(mom, daemon, alice):
    """Array sub-jobs are "N[i].host": brackets reach paths, labels, container names and cgroup dirs."""
    from cbatch.host import cgroups
    for use_cgroups in (False, True):
        job = mom.submit(script('echo "$PBS_JOBID $PBS_ARRAYID $PBS_JOBNAME $0"'), alice.name, name="arr",
                         array_index=3, cgroups=use_cgroups)
        assert "[3]" in job.job_id
        r = job.wait(120)
        assert r.exit_status == 0, r.stderr
        assert r.stdout.decode().split() == [job.job_id, "3", "arr-3", job.script_path]
        assert not job_containers(daemon.instance, job.job_id)
        assert not cgroups.existing(f"/torque/{job.job_id}")


def test_concurrent_jobs_of_two_users_do_not_mix(mom, daemon, alice, bob):
    jobs = []
    for i in range(6):
        user = (alice, bob)[i % 2]
        jobs.append((user, mom.submit(script('sleep 1; echo "$(id -un) $PBS_JOBID"; echo "e $PBS_JOBID" >&2'),
                                      user.name)))
    for user, job in jobs:
        r = job.wait(180)
        assert r.exit_status == 0, r.stderr
        assert r.stdout.decode() == f"{user.name} {job.job_id}\n"
        assert r.stderr.decode() == f"e {job.job_id}\n"
    assert not daemon.containers()


def test_tmpdir_is_the_jobs_own(mom, alice):
    job = mom.submit(script('echo "$TMPDIR"; touch "$TMPDIR/x" && stat -c "%u %a" "$TMPDIR" "$TMPDIR/x"'),
                     alice.name, tmpdir=True)
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"/tmp/{job.job_id}"
    assert lines[1] == f"{alice.uid} 700" and lines[2].startswith(f"{alice.uid} ")
    assert not os.path.exists(lines[0])        # removed after the job, as pbs_mom does
