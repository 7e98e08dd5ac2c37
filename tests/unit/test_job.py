"""Identity, Registration and JobContext builders."""

import json
import os
import pwd

import pytest

from cbatch.core.errors import JobError, PolicyError
from cbatch.core.job import Identity, JobContext, Registration

SCRIPT = "/var/spool/torque/mom_priv/jobs/1.vm.SC"
ARGV = ["1.vm", "alice", "alice", "name", "nodes=1:ppn=1,walltime=00:01:00,mem=100mb,neednodes=1:ppn=1",
        "batch", "", SCRIPT]
ALICE = Identity(user="alice", uid=1000, gid=1000, groups=(1000, 27), home="/home/alice", shell="/bin/bash")


def me() -> Identity:
    return Identity.lookup(pwd.getpwuid(os.getuid()).pw_name)


def test_identity_lookup_from_host_databases():
    ident = me()
    pw = pwd.getpwuid(os.getuid())
    assert (ident.uid, ident.gid, ident.home, ident.shell) == (pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell)
    assert ident.groups[0] == pw.pw_gid
    assert set(os.getgrouplist(pw.pw_name, pw.pw_gid)) == set(ident.groups)
    assert len(set(ident.groups)) == len(ident.groups)
    assert Identity.lookup_uid(os.getuid()) == ident
    assert Identity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident


def test_identity_unknown_user():
    with pytest.raises(PolicyError) as exc:
        Identity.lookup("no-such-user-cbatch")
    assert exc.value.message == ("cbatch: user: unknown user on this host: no-such-user-cbatch "
                                 "(the job owner must exist in this node's passwd database)")
    with pytest.raises(PolicyError):
        Identity.lookup_uid(2 ** 31 - 7)


def test_from_prologue_argv_eight_args_and_full_argv():
    reg = Registration.from_prologue_argv(ARGV, session_id=2327, now=5.0)
    assert reg == Registration(job_id="1.vm", user="alice", group="alice", name="name", resource_list=ARGV[4],
                               queue="batch", account="", script_path=SCRIPT, session_id=2327, batch="torque",
                               registered_at=5.0)
    assert Registration.from_prologue_argv(["/var/spool/torque/mom_priv/prologue"] + ARGV, now=5.0).job_id == "1.vm"


def test_from_prologue_argv_wrong_count():
    with pytest.raises(JobError) as exc:
        Registration.from_prologue_argv(ARGV[:5])
    assert exc.value.message == ("cbatch: prologue: expected 8 arguments from pbs_mom: 5 "
                                 "(jobid user group name resources queue account script)")


@pytest.mark.parametrize("index,value,message", [
    (0, "", "cbatch: job registration: empty job_id"),
    (0, "1.vm\nx", "cbatch: job registration: invalid job_id: 1.vm\\nx (without NUL or newline)"),
    (1, "", "cbatch: job registration: empty user"),
    (7, "jobs/1.vm.SC", "cbatch: job registration: script_path is not an absolute path: jobs/1.vm.SC"),
    (3, "a\0b", "cbatch: job registration: invalid name: a\\x00b (without NUL or newline)"),
])
def test_registration_validation(index, value, message):
    argv = list(ARGV)
    argv[index] = value
    with pytest.raises(JobError) as exc:
        Registration.from_prologue_argv(argv)
    assert exc.value.message == message


def test_registration_json_roundtrip():
    reg = Registration.from_prologue_argv(ARGV, session_id=42, now=1.5)
    text = json.dumps(reg.to_dict())
    assert Registration.from_dict(json.loads(text)) == reg


@pytest.mark.parametrize("change,message", [
    ({"job_id": None}, "cbatch: job registration: job_id is not a string: None"),
    ({"session_id": "12"}, "cbatch: job registration: invalid session_id: '12' (a non-negative integer)"),
    ({"session_id": True}, "cbatch: job registration: invalid session_id: True (a non-negative integer)"),
    ({"batch": "pbspro"}, "cbatch: job registration: unknown batch system: pbspro (torque | slurm | local | pbs)"),
    ({"registered_at": "now"}, "cbatch: job registration: invalid registered_at: 'now'"),
])
def test_registration_from_dict_rejects(change, message):
    data = Registration.from_prologue_argv(ARGV, now=1.0).to_dict()
    data.update(change)
    with pytest.raises(JobError) as exc:
        Registration.from_dict(data)
    assert exc.value.message == message


def test_registration_from_dict_missing_and_not_object():
    data = Registration.from_prologue_argv(ARGV, now=1.0).to_dict()
    del data["script_path"]
    with pytest.raises(JobError) as exc:
        Registration.from_dict(data)
    assert exc.value.message == "cbatch: job registration: missing field: script_path"
    with pytest.raises(JobError):
        Registration.from_dict([])


def test_from_slurm_env():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1000", "SLURM_JOB_GID": "1000",
           "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_ACCOUNT": "proj", "SLURM_JOB_NAME": "train",
           "SLURM_CPUS_ON_NODE": "4", "SLURM_MEM_PER_NODE": "64"}
    reg = Registration.from_slurm_env(env, now=3.0)
    assert reg == Registration(job_id="7", user="alice", group="1000", name="train", resource_list="ncpus=4,mem=64mb",
                               queue="debug", account="proj", script_path="/var/spool/slurmd/job00007/slurm_script",
                               session_id=None, batch="slurm", registered_at=3.0, uid=1000)
    assert Registration.from_dict(reg.to_dict()) == reg
    alt = Registration.from_slurm_env({"SLURM_JOB_ID": "123456", "SLURM_JOB_USER": "bob",
                                       "SLURM_JOB_CPUS_PER_NODE": "2(x3)"}, spool_dir="/spool/")
    assert alt.script_path == "/spool/job123456/slurm_script" and alt.resource_list == "ncpus=2"
    assert alt.uid is None


def test_from_slurm_env_rejects():
    with pytest.raises(JobError) as exc:
        Registration.from_slurm_env({"SLURM_JOB_USER": "a"})
    assert exc.value.message == "cbatch: slurm prolog: missing or invalid SLURM_JOB_ID"
    with pytest.raises(JobError):
        Registration.from_slurm_env({"SLURM_JOB_ID": "../7", "SLURM_JOB_USER": "a"})
    with pytest.raises(JobError):
        Registration.from_slurm_env({"SLURM_JOB_ID": "7"})          # no user


def test_for_start_builds_the_context():
    reg = Registration.from_prologue_argv(ARGV, session_id=2327, now=1.0)
    env = [("HOME", "/home/alice"), ("PBS_NODEFILE", "/var/spool/torque/aux//1.vm"), ("TMPDIR", "/tmp/1.vm"),
           ("PATH", "/bin:/usr/bin")]
    job = JobContext.for_start(reg, ALICE, "/bin/bash", SCRIPT + " argA 'b c'\n", "/home/alice", env,
                               cgroup_parent="/torque/1.vm")
    assert job.batch == "torque" and job.job_id == "1.vm" and job.identity == ALICE
    assert job.queue == "batch" and job.job_name == "name" and job.account == ""
    assert job.script_path == SCRIPT and job.script_args == ("argA", "b c")
    assert job.stdin_line == SCRIPT + " argA 'b c'\n" and job.shell == "/bin/bash" and job.cwd == "/home/alice"
    assert job.env == tuple(env)
    assert job.resources.mem == 100 << 20 and job.resources.walltime == 60
    assert job.node_file == "/var/spool/torque/aux//1.vm" and job.tmpdir == "/tmp/1.vm"
    assert job.cgroup_parent == "/torque/1.vm" and job.session_id == 2327
    assert job.env_dict()["PATH"] == "/bin:/usr/bin"


def test_for_start_mapping_env_and_odd_lines():
    reg = Registration.from_prologue_argv(ARGV, now=1.0)
    job = JobContext.for_start(reg, ALICE, "/bin/sh", SCRIPT + " 'unbalanced\n", "/", {"A": "1"})
    assert job.env == (("A", "1"),) and job.node_file is None and job.tmpdir is None
    assert job.script_args == ("'unbalanced",)


def test_for_start_rejects():
    reg = Registration.from_prologue_argv(ARGV, now=1.0)
    bob = Identity("bob", 1001, 1001, (1001,), "/home/bob", "/bin/sh")
    with pytest.raises(JobError) as exc:
        JobContext.for_start(reg, bob, "/bin/sh", SCRIPT + "\n", "/", {})
    assert exc.value.message == "cbatch: job: identity does not match the registered owner: bob (job 1.vm belongs to alice)"
    with pytest.raises(JobError) as exc:
        JobContext.for_start(reg, ALICE, "bash", SCRIPT + "\n", "/", {})
    assert exc.value.message == "cbatch: job: shell is not an absolute path: bash"
    with pytest.raises(JobError):
        JobContext.for_start(reg, ALICE, "/bin/sh", SCRIPT + "\n", "home", {})
    bad = Registration.from_prologue_argv(ARGV[:4] + ["mem=lots"] + ARGV[5:], now=1.0)
    with pytest.raises(JobError) as exc:
        JobContext.for_start(bad, ALICE, "/bin/sh", SCRIPT + "\n", "/", {})
    assert exc.value.message.startswith("cbatch: resource list: malformed mem: mem=lots")


def test_dataclasses_are_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALICE.uid = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        Registration.from_prologue_argv(ARGV).user = "root"


def test_stdlib_only_modules():
    """The job starter imports these: they must not pull in yaml or docker."""
    import subprocess
    import sys
    code = ("import sys; import cbatch.core.job, cbatch.core.resources, cbatch.core.directives, cbatch.core.errors;"
            "bad = [m for m in ('yaml', 'docker', 'cbatch.core.config', 'cbatch.core.policy') if m in sys.modules];"
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
