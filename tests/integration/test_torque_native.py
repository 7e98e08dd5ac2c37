"""End-to-end 7: a queue whose default is native runs the job without a container, indistinguishably."""

from __future__ import annotations

import pytest

from torque_helpers import job_containers, script

BODY = """
cat; echo "stdin-rc=$?"
echo "hello $(id -un) $#"
echo "to-stderr" >&2
printf 'bin\\x00\\x01\\xff\\n'
exit 7
"""


def test_native_runs_without_container(mom, daemon, alice):
    job = mom.submit(script("""
test -e /.cbatch && echo container || echo native
grep -c docker /proc/self/cgroup || true
echo "ppid-comm=$(cat /proc/$PPID/comm)"
""", image=None), alice.name, queue="native")
    r = job.wait(60)
    assert r.exit_status == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "native"
    assert lines[1] == "0"
    assert not job_containers(daemon.instance, job.job_id)


@pytest.mark.parametrize("args", [[], ["x", "y"]])
def test_native_and_container_are_identical(mom, alice, args):
    native = mom.submit(script(BODY, image=None), alice.name, queue="native", args=args).wait(60)
    contained = mom.submit(script(BODY, image=None), alice.name, queue="debian", args=args).wait(120)
    assert native.exit_status == contained.exit_status == 7
    # stdin is the pipe pbs_mom wrote the line into: at EOF for the script, in both worlds (no hang).
    assert native.stdout == contained.stdout == (f"stdin-rc=0\nhello {alice.name} {len(args)}\n".encode()
                                                 + b"bin\x00\x01\xff\n")
    assert native.stderr == contained.stderr == b"to-stderr\n"


def test_native_identity_and_env(mom, alice, workdir):
    r = mom.submit(script('echo "$(id -u) $(id -g) $(pwd) $0 $PBS_JOBID"', image=None), alice.name,
                   queue="native", initdir=str(workdir)).wait(60)
    assert r.exit_status == 0, r.stderr
    uid, gid, cwd, zero, jobid = r.stdout.decode().split()
    assert (int(uid), int(gid), cwd) == (alice.uid, alice.gid, str(workdir))
    assert zero.endswith(".SC") and jobid in zero
