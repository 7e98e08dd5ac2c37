"""``cbatch run`` inside jobs of a real Slurm cluster (scripts/slurm-up), with real Docker and real users.

Jobs are submitted with ``sbatch`` as cbt-alice/cbt-bob (never root); slurmd's Prolog/Epilog (the cbatch
shims) register and unregister them with the test daemon; the daemon authorises ``cbatch run`` by the
caller's cgroup ``/slurm_<node>/uid_<uid>/job_<id>`` and nests the container there.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest_slurm import CBATCH, slurm  # noqa: F401  (the fixture)
from torque_helpers import container_pid

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.docker]
IMG = "cbatch-test/busybox:1"
KILL_WAIT = 2.0     # KillWait in config/slurm/slurm.conf.in


@pytest.fixture(autouse=True)
def _cancel_leftovers(slurm):
    yield
    slurm.cancel_leftovers()


def _wait_containers(job, count: int = 1, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = job.containers(all_states=False)
        if len(ids) >= count:
            return ids
        if job.state() not in ("PENDING", "RUNNING", "CONFIGURING", ""):
            break
        time.sleep(0.1)
    pytest.fail(f"job {job.job_id}: {count} running container(s) never appeared\n{job.dump()}")


def _cbatch_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("cbatch")]


def test_output_exit_code_and_identity(slurm, users):
    alice = users["cbt-alice"]
    job = slurm.submit("cbt-alice", f"""
cbatch run --image {IMG} sh -c 'echo out-line; echo err-line >&2; exit 42'
echo "rc=$?"
cbatch run --image {IMG} id -u
cbatch run --image {IMG} id -g
cbatch run --image {IMG} id -G
cbatch run --image {IMG} -- printf '%s|' a 'b c' '$HOME'
echo
""")
    fields = job.wait()
    out, err = job.stdout(), job.stderr()
    assert fields["JobState"] == "COMPLETED", job.dump()
    assert out.splitlines() == ["out-line", "rc=42", str(alice.uid), str(alice.gid),
                            " ".join(map(str, alice.groups)), "a|b c|$HOME|"], job.dump()
    assert err.splitlines() == ["err-line"], job.dump()
    assert not job.containers(), "containers left after the job"


def test_partition_decides_the_default(slurm, users):
    body = "cbatch run sh -c 'test -e /.cbatch && echo container || echo native; id -un'\necho rc=$?\n"
    native = slurm.submit("cbt-bob", body)
    boxed = slurm.submit("cbt-bob", body, "--partition=debug")
    native.wait()
    boxed.wait()
    assert native.stdout().splitlines() == ["native", "cbt-bob", "rc=0"], native.dump()
    # In the container the user has no passwd entry unless the image has one: `id -un` may print the uid.
    lines = boxed.stdout().splitlines()
    assert lines[0] == "container" and lines[-1] == "rc=0", boxed.dump()
    assert lines[1] in ("cbt-bob", str(users["cbt-bob"].uid)), boxed.dump()


def test_container_nested_in_job_cgroup_and_removed(slurm, users):
    alice = users["cbt-alice"]
    job = slurm.submit("cbt-alice", f"cbatch run --image {IMG} sh -c 'echo ready; sleep 5'\necho rc=$?\n")
    (cid,) = _wait_containers(job)
    pid = container_pid(cid)
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    want = f"/slurm_{slurm.node}/uid_{alice.uid}/job_{job.job_id}/"
    memory = [line for line in lines if ":memory:" in line]
    assert memory and memory[0].split(":", 2)[2].startswith(want), lines
    # The job's memory cgroup holds the container's: Slurm's limit applies to it through the hierarchy.
    fields = job.wait()
    assert fields["JobState"] == "COMPLETED"
    assert job.stdout().splitlines() == ["ready", "rc=0"], job.dump()
    assert not job.containers()
    assert job.cgroup_dirs() == [], "cgroup directories left after the Epilog"


def test_memory_limit_holds_and_is_reported(slurm):
    job = slurm.submit("cbt-alice", f"""
cbatch run --image {IMG} dd if=/dev/zero of=/dev/null bs=200M count=1
echo "rc=$?"
""", "--mem=64M")
    job.wait()
    assert job.stdout().splitlines() == ["rc=137"], job.dump()
    lines = _cbatch_lines(job.stderr())
    print(lines)
    assert len(lines) == 1, job.dump()
    assert "memory" in lines[0].lower(), lines
    assert not job.containers()
    assert job.cgroup_dirs() == []


def test_scancel_removes_container_and_cgroups(slurm):
    # The command ignores SIGTERM, so only the SIGKILL Slurm sends after KillWait (to `cbatch run`, whose
    # connection then closes) gets the container removed: the worst case.
    job = slurm.submit("cbt-alice", f"""
cbatch run --image {IMG} sh -c 'trap "" TERM; echo ready; while :; do sleep 1; done'
""")
    _wait_containers(job)
    job.wait_output("ready")
    t0 = time.monotonic()
    subprocess.run(["scancel", job.job_id], check=True)
    # Bounded against a hang only (how fast is the bench's business): gone once Slurm's SIGKILL after
    # KillWait closed the client's connection.
    while job.containers() and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    print(f"container removed {time.monotonic() - t0:.2f}s after scancel (KillWait {KILL_WAIT:.0f}s)")
    assert not job.containers(), job.dump()
    fields = job.wait()
    assert fields["JobState"] == "CANCELLED"
    assert job.cgroup_dirs() == [], "cgroup directories left after the Epilog"


def test_scancel_sigterm_reaches_container(slurm):
    # `scancel --signal=TERM` signals the job's steps (not the batch shell): `cbatch run` under srun gets it
    # and forwards it; the command's handler runs and its status comes back through srun.
    job = slurm.submit("cbt-alice", f"""
srun cbatch run --image {IMG} sh -c 'trap "echo got-TERM; exit 3" TERM; echo ready; while :; do sleep 0.2; done'
echo "rc=$?"
""")
    job.wait_output("ready")
    subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True)
    job.wait_output("got-TERM", timeout=10)
    fields = job.wait()
    assert fields["JobState"] == "COMPLETED", job.dump()
    lines = job.stdout().splitlines()
    print(lines)
    assert lines[:2] == ["ready", "got-TERM"], job.dump()
    # cbatch run ends the way the command did when the signal was its own: srun reports 3, or 143 when the
    # client re-raised SIGTERM on itself after forwarding it.
    assert lines[2] in ("rc=3", "rc=143"), job.dump()
    assert not job.containers()


def test_srun_four_ranks(slurm):
    job = slurm.submit("cbt-alice", f"""
srun -n 4 bash -c 'cbatch run --image {IMG} sh -c "echo rank=\\$SLURM_PROCID cg=\\$(grep -m1 :memory: /proc/self/cgroup); exit \\$((10 + SLURM_PROCID))"; echo "rc[$SLURM_PROCID]=$?"'
echo "srun=$?"
srun -n 4 cbatch run --image {IMG} sh -c 'echo direct=$SLURM_PROCID; exit $SLURM_PROCID'
echo "srun-direct=$?"
""", "-n", "4")
    fields = job.wait(timeout=120)
    out = job.stdout().splitlines()
    ranks = sorted(line.split()[0] for line in out if line.startswith("rank="))
    assert ranks == ["rank=0", "rank=1", "rank=2", "rank=3"], job.dump()
    cgroups = {line.split("cg=", 1)[1] for line in out if line.startswith("rank=")}
    assert len(cgroups) == 4, cgroups        # four distinct containers
    assert all(f"/job_{job.job_id}/" in c for c in cgroups), cgroups
    codes = sorted(line for line in out if line.startswith("rc["))
    assert codes == ["rc[0]=10", "rc[1]=11", "rc[2]=12", "rc[3]=13"], job.dump()
    assert "srun=0" in out
    # srun -n 4 cbatch run ... directly: four containers, srun exits with the highest rank status.
    assert sorted(line for line in out if line.startswith("direct=")) == [f"direct={i}" for i in range(4)]
    assert "srun-direct=3" in out, job.dump()
    assert fields["JobState"] == "COMPLETED"
    assert not job.containers()


def test_refused_outside_any_job(slurm, users):
    # A user's shell on the node, not in any job; and the same with a forged Slurm environment.
    env = {"PATH": "/usr/bin:/bin", "CBATCH_SOCKET": slurm.socket, "HOME": users["cbt-bob"].home}
    for extra in ({}, {"SLURM_JOB_ID": "1", "SLURM_JOB_UID": str(users["cbt-alice"].uid),
                       "SLURM_JOB_USER": "cbt-alice"}):
        res = subprocess.run(["runuser", "-u", "cbt-bob", "--", "env", *[f"{k}={v}" for k, v in
                              {**env, **extra}.items()], CBATCH, "run", "--image", IMG, "true"],
                             capture_output=True, text=True, timeout=30, cwd="/")
        print(res.stderr.strip())
        assert res.returncode != 0
        assert res.stdout == ""
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert res.stderr.startswith("cbatch: "), res.stderr


def test_refused_claiming_another_users_job(slurm, users):
    # bob's process is put (by root) into alice's job cgroup: the cgroup says uid_<alice>, the peer is bob.
    job = slurm.submit("cbt-alice", "echo ready; sleep 30\n")
    job.wait_output("ready")
    alice = users["cbt-alice"]
    rel = f"slurm_{slurm.node}/uid_{alice.uid}/job_{job.job_id}"
    env = ["env", "PATH=/usr/bin:/bin", f"CBATCH_SOCKET={slurm.socket}", f"SLURM_JOB_ID={job.job_id}"]
    gate_r, gate_w = os.pipe()
    proc = subprocess.Popen(["runuser", "-u", "cbt-bob", "--", "sh", "-c", 'read x; exec "$@"', "sh", *env,
                             CBATCH, "run", "--image", IMG, "true"],
                            stdin=gate_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    os.close(gate_r)
    try:
        time.sleep(0.3)
        # The `sh` runuser started as bob (runuser forks): move it into alice's job before it runs cbatch.
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        target = kids[0] if kids else str(proc.pid)
        for ctrl in ("memory", "freezer"):
            with open(f"/sys/fs/cgroup/{ctrl}/{rel}/cgroup.procs", "w") as f:
                f.write(target)
        with open(f"/proc/{target}/cgroup") as f:
            assert f"/{rel}" in f.read()      # bob's process really is inside alice's job now
        os.write(gate_w, b"go\n")
    finally:
        os.close(gate_w)
    out, err = proc.communicate(timeout=30)
    print(err.strip())
    assert proc.returncode != 0
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("cbatch: "), err
    subprocess.run(["scancel", job.job_id], check=True)
    job.wait()
