"""TM tasks (``pbsdsh -u /bin/echo x``) through the job starter, and OOM of a child (issue #10 items 2, 4).

pbs_mom's start_process execs ``[starter, argv...]`` as a fresh child of pbs_mom in its own session, stdin
/dev/null, stdout/stderr the job's spool files. Before the fix the starter failed 125 ("expected exactly one
argument, the absolute path of the shell") and the daemon would have refused a second start for the job.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from torque_helpers import cbatch_lines, script, wait_until

pytestmark = [pytest.mark.root, pytest.mark.docker]

# The job waits for its task to finish (the test writes "go" once the task is done), then reports.
WAITER = """
echo job-started
while [ ! -e "$HOME/.cbt-task-{tag}" ]; do sleep 0.1; done
rm -f "$HOME/.cbt-task-{tag}"
echo job-done
"""


def _run_task(job, argv):
    """Spawn a task like pbs_mom, wait for it; return (status, stdout bytes, stderr bytes) via pipes."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proc = job.spawn_task(argv, stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r, "rb") as fo, os.fdopen(err_r, "rb") as fe:
        out, err = fo.read(), fe.read()
    return proc.wait(60), out, err


def _release(alice, tag):
    path = os.path.join(alice.home, f".cbt-task-{tag}")
    with open(path, "w"):
        pass
    os.chown(path, alice.uid, alice.gid)


@pytest.mark.parametrize("where", ["container", "native"])
def test_tm_task_runs_where_the_job_runs(mom, daemon, alice, where):
    tag = f"{where}-{os.getpid()}"
    image = "cbatch-test/debian:12" if where == "container" else None
    job = mom.submit(script(WAITER.format(tag=tag), image=image), alice.name,
                     queue="batch" if image else "native")
    try:
        assert job.wait_output(b"job-started\n", timeout=120), job.peek()
        status, out, err = _run_task(job, ["/bin/sh", "-c",
                                           'echo "task $(id -u) $PBS_TASKNUM $PBS_JOBID $(pwd)"; '
                                           'test -e /.cbatch/exec && echo in-container; '
                                           'grep -E "^Seccomp(_filters)?:" /proc/self/status | tr -s "\t " " "; '
                                           'echo to-stderr >&2; exit 6'])
    finally:
        _release(alice, tag)
    r = job.wait(120)
    assert status == 6, (out, err, r.stderr)
    assert out.startswith(f"task {alice.uid} 2 {job.job_id} {alice.home}\n".encode()), (out, err)
    assert err == b"to-stderr\n"
    # Inside the job's container (a debian image) or on the host (whatever the host is), never failing.
    assert (b"in-container" in out) == (where == "container"), out
    if where == "container":        # the task is under the container's one filter, with either engine
        assert b"Seccomp: 2\nSeccomp_filters: 1\n" in out, out
    assert r.exit_status == 0, r.stderr
    assert r.stdout == b"job-started\njob-done\n"
    assert not [l for l in cbatch_lines(r.stderr)], r.stderr


def test_tm_task_echo_goes_to_the_job_output(mom, daemon, alice):
    """``pbsdsh -u /bin/echo x``: the task's argv, its stdout the job's spool file (single node)."""
    tag = f"echo-{os.getpid()}"
    job = mom.submit(script(WAITER.format(tag=tag)), alice.name)
    try:
        assert job.wait_output(b"job-started\n", timeout=120), job.peek()
        proc = job.spawn_task(["/bin/echo", "x"])
        assert proc.wait(60) == 0
    finally:
        _release(alice, tag)
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == b"job-started\nx\njob-done\n", r.stdout


def test_task_killed_when_the_job_ends(mom, daemon, alice):
    """A task still running when the job's script ends dies with the job (its container is removed)."""
    job = mom.submit(script("echo job-started; sleep 600"), alice.name)
    assert job.wait_output(b"job-started\n", timeout=120), job.peek()
    out_r, out_w = os.pipe()
    proc = job.spawn_task(["/bin/sh", "-c", "echo task-up; exec sleep 600"], stdout=out_w)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as fo:
        assert fo.readline() == b"task-up\n"
        job.qdel()
        r = job.wait(120)
        assert proc.wait(30) is not None
    assert r.exit_status == 271
    assert wait_until(lambda: not _sleeping_as(alice.uid), 30) is not None, "the task's sleep survived the job"


def _sleeping_as(uid: int) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{pid}")
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if st.st_uid == uid and cmd == b"sleep\x00600\x00":
            return True
    return False


def test_task_of_another_users_job_is_refused(mom, daemon, alice, bob):
    """A process of bob's that names alice's job in PBS_JOBID cannot join her container."""
    tag = f"bob-{os.getpid()}"
    job = mom.submit(script(WAITER.format(tag=tag)), alice.name)
    try:
        assert job.wait_output(b"job-started\n", timeout=120), job.peek()
        env = dict(job.plan["env"], PBS_JOBID=job.job_id, HOME=bob.home, USER=bob.name)
        p = subprocess.run([mom.starter, "/bin/echo", "joined"], env=env, user=bob.uid, group=bob.gid,
                           extra_groups=[], stdin=subprocess.DEVNULL, capture_output=True,
                           start_new_session=True, timeout=60, cwd="/")
    finally:
        _release(alice, tag)
    assert job.wait(120).exit_status == 0
    assert p.returncode == 125, p
    assert b"joined" not in p.stdout
    assert p.stderr.startswith(b"cbatch: task: "), p.stderr


def test_oom_of_a_child_keeps_the_scripts_status(mom, daemon, alice):
    """A child killed by the OOM killer while the script goes on and exits 3: status 3, one OOM line."""
    body = ('echo start; bash -c \'x=$(head -c 400m /dev/zero | tr "\\0" a); echo child-survived\'; '
            'echo "child $?"; exit 3')
    r = mom.submit(script(body), alice.name, resources="nodes=1:ppn=1,walltime=00:05:00,mem=64mb").wait(120)
    assert r.stdout == b"start\nchild 137\n", (r.stdout, r.stderr)
    assert r.exit_status == 3, (r.stdout, r.stderr)
    oom = [l for l in cbatch_lines(r.stderr) if "out of memory" in l]
    assert len(oom) == 1, r.stderr


def test_task_started_by_the_job_itself_is_refused(mom, daemon, alice):
    """A job process that makes itself a session leader and runs the starter as a "task" is not a TM task:
    its parent is the job's shell, not pbs_mom."""
    body = f"setsid -w {mom.starter} /bin/echo joined </dev/null; echo rc=$?"
    r = mom.submit(script(body, image=None), alice.name, queue="native").wait(120)
    assert r.stdout == b"rc=125\n", (r.stdout, r.stderr)
    assert b"cbatch: task: peer was not started by the job's pbs_mom" in r.stderr, r.stderr
