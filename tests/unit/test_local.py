"""The pbs_mom emulator itself (cbatch.emulator.local), with probe hooks and a probe starter: no daemon, no engine.

These pin the emulator to what a real TORQUE 6.1 mom was seen doing (torque-mom.md), so the end-to-end
tests built on it prove behaviour under the real thing. Needs root (it plays pbs_mom); run as root.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from cbatch.emulator.local import Mom

pytestmark = pytest.mark.root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

PROBE = """#!/bin/bash
{ echo "ARGV $*"; echo "NARGS $#"; echo "IDS $(id -u) $(id -g) $(id -G)"; echo "PPID $PPID";
  echo "UMASK $(umask)"; echo "CWD $(pwd)"; echo "STDIN $(readlink /proc/self/fd/0)";
  env -0 | sort -z | tr '\\0' '\\n' | grep -v -e '^_=' -e '^SHLVL=' -e '^PWD=' | sed 's/^/ENV /'; } >> %s
exit %s
"""
STARTER = """#!/bin/bash
{ echo "ARGV $0 $*"; echo "IDS $(id -u) $(id -g) $(id -G)"; echo "RES $(id -ru) $(id -rg)";
  echo "PID $$ $(ps -o pgid=,sid= -p $$ | tr -s ' ')"; echo "UMASK $(umask)"; echo "CWD $(pwd)";
  echo "LIMITS $(ulimit -d) $(ulimit -m) $(ulimit -n) $(ulimit -c)"; echo "STDIN $(stat -L -c %F /proc/self/fd/0)";
  echo "CG $(grep memory /proc/self/cgroup)"; echo "FDS $(ls /proc/$$/fd | sort -n | tr '\\n' ' ')"; } > /dev/null
read -r line
echo "LINE $line"
exec "$1" -c "$line"
"""
if shutil.which("ps") is None:
    STARTER = STARTER.replace('$(ps -o pgid=,sid= -p $$ | tr -s \' \')', '$(cut -d" " -f5,6 /proc/$$/stat)')


@pytest.fixture(scope="module")
def alice():
    import users
    return users.ensure()["cbt-alice"]


@pytest.fixture
def tree(tmp_path):
    root = Path("/var/spool/cbatch-test") / f"unit-{os.getpid()}-{time.monotonic_ns()}"
    root.parent.mkdir(mode=0o755, exist_ok=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.parent / (root.name + "-log"), ignore_errors=True)


def make_mom(tree, prologue_rc=0, starter=None, **kw):
    logs = tree.parent / (tree.name + "-log")
    logs.mkdir(exist_ok=True)
    os.chmod(logs, 0o777)
    mom = Mom(str(tree), prologue=PROBE % (logs / "prologue", prologue_rc), epilogue=PROBE % (logs / "epilogue", 0),
              starter=starter or STARTER.replace("> /dev/null", f">> {logs / 'starter'}"), **kw)
    return mom, logs


def read_log(logs, name):
    text = (logs / name).read_text() if (logs / name).exists() else ""
    return [l for l in text.splitlines()]


def env_of(lines):
    return dict(l[4:].split("=", 1) for l in lines if l.startswith("ENV "))


def value(lines, key):
    return next(l[len(key) + 1:] for l in lines if l.startswith(key + " "))


def test_prologue_starter_epilogue_as_pbs_mom(tree, alice):
    mom, logs = make_mom(tree)
    job = mom.submit(b"#!/bin/bash\necho out $0 $@\necho err >&2\nexit 3\n", alice.name, args=["a", "b"],
                     resources="nodes=1:ppn=2,walltime=00:01:00,mem=100mb", variables={"EXITCODE": "3"},
                     name="name", tmpdir=True)
    sc = os.stat(job.script_path)
    assert (sc.st_uid, stat.S_IMODE(sc.st_mode)) == (alice.uid, 0o700)
    assert stat.S_IMODE(os.stat(mom.mom_priv).st_mode) == 0o751
    for path in (job.stdout_path, job.stderr_path):
        st = os.stat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600)
    r = job.wait(30)
    assert r.exit_status == 3 and r.prologue_status == 0 and r.epilogue_status == 0
    assert r.stdout == f"LINE {job.script_path} a b\nout {job.script_path} a b\n".encode()
    assert r.stderr == b"err\n"

    pro = read_log(logs, "prologue")
    assert value(pro, "ARGV") == (f"{job.job_id} {alice.name} {alice.group} name "
                                  f"nodes=1:ppn=2,walltime=00:01:00,mem=100mb,neednodes=1:ppn=2 batch  {job.script_path}")
    assert value(pro, "NARGS") == "8"
    assert value(pro, "IDS") == "0 0 0 " + " ".join(map(str, sorted(alice.groups)))  # real mom: the owner's groups
    assert value(pro, "PPID") == str(r.session_id)          # the prologue's parent became the starter
    assert value(pro, "UMASK") == "0077" and value(pro, "CWD") == mom.mom_priv
    assert value(pro, "STDIN") == "/dev/null"
    assert sorted(env_of(pro)) == ["LANG", "PATH", "PBS_MSHOST", "PBS_NODEFILE", "PBS_NODENUM", "PBS_NP",
                                   "PBS_NUM_NODES", "PBS_NUM_PPN", "PBS_O_WORKDIR", "PBS_RESOURCE_NODES",
                                   "TMPDIR"]   # this job has a TMPDIR ($tmpdir): the real mom passes it to hooks
    assert env_of(pro)["PATH"] == "/bin:/usr/bin"

    st = read_log(logs, "starter")
    assert value(st, "ARGV") == f"{mom.starter} /bin/bash"
    assert value(st, "IDS") == f"{alice.uid} {alice.gid} " + " ".join(map(str, alice.groups))
    assert value(st, "RES") == f"{alice.uid} {alice.gid}"
    pid, pgid, sid = value(st, "PID").split()
    assert pid == pgid == sid == str(r.session_id)
    assert value(st, "UMASK") == "0077" and value(st, "CWD") == alice.home
    assert value(st, "LIMITS") == "102400 102400 20000 0"
    assert value(st, "STDIN") == "fifo"
    assert {"0", "1", "2", "9", "14"} <= set(value(st, "FDS").split())      # as the real mom (tests/torque)

    epi = read_log(logs, "epilogue")
    args = value(epi, "ARGV").split(" ")
    assert value(epi, "NARGS") == "11"
    assert args[0] == job.job_id and args[4] == str(r.session_id) and args[-2] == "3"
    assert args[-1] == job.script_path and args[6].startswith("cput=")
    assert value(epi, "UMASK") == "0022" and value(epi, "IDS") == "0 0 0 " + " ".join(map(str, sorted(alice.groups)))
    # After the job: spool, script, node file and TMPDIR are gone.
    for path in (job.script_path, job.stdout_path, job.stderr_path, job.plan["nodefile"], job.tmpdir):
        assert not os.path.exists(path), path


def test_job_environment(tree, alice):
    mom, logs = make_mom(tree)
    r = mom.submit(b"#!/bin/bash\nenv\n", alice.name, resources="nodes=1:ppn=1,walltime=00:01:00,mem=100mb",
                   variables={"EXITCODE": "3"}, name="name", tmpdir=True).wait(30)
    env = dict(l.split("=", 1) for l in r.stdout.decode().splitlines()[1:] if "=" in l)
    for key in ("ENVIRONMENT", "EXITCODE", "HOME", "HOSTNAME", "LANG", "LOGNAME", "PATH", "PBS_ENVIRONMENT",
                "PBS_GPUFILE", "PBS_JOBCOOKIE", "PBS_JOBID", "PBS_JOBNAME", "PBS_MICFILE", "PBS_MOMPORT",
                "PBS_NODEFILE", "PBS_NODENUM", "PBS_NP", "PBS_NUM_NODES", "PBS_NUM_PPN", "PBS_O_HOME",
                "PBS_O_HOST", "PBS_O_LANG", "PBS_O_LOGNAME", "PBS_O_MAIL", "PBS_O_PATH", "PBS_O_QUEUE",
                "PBS_O_SERVER", "PBS_O_SHELL", "PBS_O_WORKDIR", "PBS_QUEUE", "PBS_TASKNUM", "PBS_VERSION",
                "PBS_VNODENUM", "PBS_WALLTIME", "SHELL", "USER", "TMPDIR"):
        assert key in env, key
    assert env["PATH"] == "/bin:/usr/bin" and env["ENVIRONMENT"] == "BATCH" and env["PBS_WALLTIME"] == "60"
    assert env["PBS_NODEFILE"] == f"{mom.aux}//{env['PBS_JOBID']}" and env["TMPDIR"].startswith("/tmp/")
    assert env["EXITCODE"] == "3" and env["USER"] == alice.name and env["HOSTNAME"] == ""


def test_prologue_exit_1_aborts_without_output(tree, alice):
    mom, logs = make_mom(tree, prologue_rc=1)
    r = mom.submit(b"#!/bin/bash\necho never\n", alice.name).wait(30)
    assert r.aborted and r.exit_status == -2 and r.epilogue_ran and r.epilogue_status == 0
    assert r.stdout == r.stderr == b""
    assert not (logs / "starter").exists()
    assert value(read_log(logs, "epilogue"), "ARGV").split(" ")[-2] == "-2"


def test_prologue_other_exit_requeues(tree, alice):
    mom, logs = make_mom(tree, prologue_rc=2, max_requeues=3)
    r = mom.submit(b"#!/bin/bash\necho never\n", alice.name).wait(30)
    assert r.exit_status is None and r.requeues == 3 and not r.epilogue_ran
    assert len([l for l in read_log(logs, "prologue") if l.startswith("ARGV")]) == 4


def test_bad_hook_permissions_requeue(tree, alice):
    mom, logs = make_mom(tree, max_requeues=1)
    os.chmod(mom.prologue, 0o777)
    r = mom.submit(b"#!/bin/bash\necho never\n", alice.name).wait(30)
    assert r.exit_status is None and r.requeues == 1


def test_qdel_kill_delay_and_session_sweep(tree, alice):
    # A starter that ignores SIGTERM: the mom SIGKILLs it after kill_delay (265).
    stubborn = "#!/bin/bash\ntrap '' TERM\nread -r line\necho started\nsleep 60 & wait\n"
    mom, logs = make_mom(tree, starter=stubborn)
    job = mom.submit(b"#!/bin/bash\n", alice.name, kill_delay=1.0)
    assert job.wait_output(b"started", timeout=10)
    job.qdel()
    r = job.wait(30)
    assert r.exit_status == 265 and r.kill_delay_killed     # killed by the mom's SIGKILL at kill_delay
    from cbatch.emulator import momproc
    assert momproc.session_pids(r.session_id) == []


def test_starter_exit_kills_session_leftovers(tree, alice):
    leaver = "#!/bin/bash\nread -r line\nsleep 300 &\nsleep 301 &\nexit 0\n"
    mom, logs = make_mom(tree, starter=leaver)
    r = mom.submit(b"#!/bin/bash\n", alice.name).wait(30)
    assert r.exit_status == 0
    from cbatch.emulator import momproc
    assert momproc.session_pids(r.session_id) == []       # the "sleep &" was SIGKILLed with no grace


def test_killed_by_signal_is_256_plus_n(tree, alice):
    mom, logs = make_mom(tree, starter="#!/bin/bash\nkill -TERM $$\n")
    r = mom.submit(b"#!/bin/bash\n", alice.name).wait(30)
    assert r.exit_status == 271


def test_walltime_poll(tree, alice):
    mom, logs = make_mom(tree, starter="#!/bin/bash\nread -r line\nsleep 60\n")
    r = mom.submit(b"#!/bin/bash\n", alice.name, resources="walltime=00:00:01", walltime_poll=1.0).wait(30)
    assert r.walltime_killed and r.exit_status == 271
    assert b"=>> PBS: job killed: walltime" in r.stderr and b"exceeded limit 1" in r.stderr


def test_initdir_sets_cwd(tree, alice):
    mom, logs = make_mom(tree)
    r = mom.submit(b"#!/bin/bash\npwd; echo $PBS_O_INITDIR\n", alice.name, initdir="/tmp").wait(30)
    assert r.stdout.decode().splitlines()[1:] == ["/tmp", "/tmp"]


def test_torque_cgroups_on_fake_tree(tree, alice, tmp_path):
    fake = tmp_path / "cg"
    for ctl in ("cpuacct", "cpuset", "memory", "devices"):
        (fake / ctl).mkdir(parents=True)
    (fake / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (fake / "cpuset" / "cpuset.mems").write_text("0\n")
    mom, logs = make_mom(tree, cgroup_root=str(fake))
    job = mom.submit(b"#!/bin/bash\n", alice.name, resources="nodes=1:ppn=2,mem=64mb", cgroups=True)
    jobdir = fake / "memory" / "torque" / job.job_id
    assert (jobdir / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (fake / "cpuset" / "torque" / job.job_id / "cpuset.cpus").read_text() == "0,1"
    r = job.wait(30)
    assert (jobdir / "tasks").read_text() == str(r.session_id)    # the starter was attached before exec
    # Plain directories with files cannot be rmdir'ed: the mom reports them as leftovers, as TORQUE would.
    assert len(r.cgroup_leftovers) == 4


def test_prologue_timeout_requeues(tree, alice):
    mom, logs = make_mom(tree, max_requeues=1, prologalarm=0.5)
    from cbatch.admin import install
    from cbatch.emulator import momproc
    waited_out = logs / "prologue-waited-out"
    install.write_file(mom.prologue, f"#!/bin/sh\nsleep 10\ntouch {waited_out}\n", 0o500)
    r = mom.submit(b"#!/bin/bash\necho never\n", alice.name).wait(30)
    assert r.exit_status is None and r.requeues == 1 and r.prologue_status == momproc.HOOK_TIMEOUT
    # Both runs were killed at the alarm, not waited out: neither prologue got past its sleep.
    assert not waited_out.exists()


def test_busy_mom_descriptors_do_not_clash_with_leaked_ones(tree, alice):
    """A mom with many open files (pytest...) gets high pipe numbers; they must not collide with 9 and 14."""
    mom, logs = make_mom(tree)
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
    try:
        r = mom.submit(b"#!/bin/bash\necho ok\n", alice.name).wait(30)
    finally:
        for fd in held:
            os.close(fd)
    assert r.exit_status == 0 and r.stdout.endswith(b"ok\n")
    assert {"9", "14"} <= set(value(read_log(logs, "starter"), "FDS").split())


# ---- root never removes, chowns or writes a path the job named (issue 9.9) ------------------------------
@pytest.fixture
def victim():
    """A root-owned directory with a file: what a job must never get removed or chowned."""
    path = Path(f"/var/spool/cbatch-test/victim-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir(mode=0o755, parents=True)
    (path / "precious").write_text("keep\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assert_intact(victim):
    st = os.lstat(victim)
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0)
    assert (victim / "precious").read_text() == "keep\n"


@pytest.mark.parametrize("own_tmpdir", [False, True])
def test_tmpdir_named_by_the_job_is_never_removed(tree, alice, victim, own_tmpdir):
    """``#PBS -v TMPDIR=/etc``-like: the old emulator removed the job's TMPDIR variable recursively as root."""
    mom, logs = make_mom(tree)
    job = mom.submit(b"#!/bin/bash\necho \"T=$TMPDIR\"\n", alice.name, variables={"TMPDIR": str(victim)},
                     tmpdir=own_tmpdir)
    r = job.wait(30)
    assert r.exit_status == 0
    assert_intact(victim)
    if own_tmpdir:      # the mom's own TMPDIR replaced the job's, and is gone afterwards
        assert job.tmpdir and job.tmpdir != str(victim) and not os.path.lexists(job.tmpdir)
        assert f"T={job.tmpdir}\n".encode() in r.stdout
    else:
        assert job.tmpdir is None


def test_tmpdir_name_planted_beforehand_is_not_followed(tree, alice, victim):
    """Job ids are predictable: a symlink planted at ``<tmpdir>/<next id>`` made root chown its target."""
    base = tree.parent / (tree.name + "-tmp")
    base.mkdir(mode=0o1777)
    os.chmod(base, 0o1777)
    try:
        first = 10 ** 9 + os.getpid() * 100
        mom, _ = make_mom(tree, first_id=first, tmpdir_base=str(base))
        planted = base / f"{first}.{mom.host}"
        os.symlink(str(victim), planted)
        os.lchown(planted, alice.uid, alice.gid)
        from cbatch.core.errors import JobError
        with pytest.raises(JobError) as info:
            mom.submit(b"#!/bin/bash\ntrue\n", alice.name, tmpdir=True)
        assert info.value.message.startswith(f"cbatch: TMPDIR: already exists; the mom makes a fresh one per job: {planted}")
        assert_intact(victim)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_symlink_planted_in_tmpdir_is_not_followed_at_removal(tree, alice, victim):
    mom, _ = make_mom(tree)
    body = (f"#!/bin/bash\nln -s {victim} \"$TMPDIR/link\"\nln -s {victim}/precious \"$TMPDIR/file\"\n"
            f"mkdir \"$TMPDIR/d\" && ln -s {victim} \"$TMPDIR/d/up\"\nls -l \"$TMPDIR\"\n").encode()
    job = mom.submit(body, alice.name, tmpdir=True)
    r = job.wait(30)
    assert r.exit_status == 0 and b"link ->" in r.stdout
    assert_intact(victim) and not os.path.lexists(job.tmpdir)


def test_tmpdir_swapped_for_a_symlink_is_not_followed_at_removal(tree, alice, victim):
    """The job owns its TMPDIR's name in the sticky base: it renames the directory away and leaves a
    symlink to a root directory in its place. Removal runs as the job's user, who cannot touch the target."""
    mom, _ = make_mom(tree)
    body = f"#!/bin/bash\nmv \"$TMPDIR\" \"$TMPDIR.away\" && ln -s {victim} \"$TMPDIR\" && echo swapped\n".encode()
    job = mom.submit(body, alice.name, tmpdir=True)
    try:
        r = job.wait(30)
        assert b"swapped\n" in r.stdout and os.path.islink(job.tmpdir)
        assert_intact(victim)
    finally:
        for p in (job.tmpdir, job.tmpdir + ".away"):
            if os.path.islink(p):
                os.unlink(p)
            shutil.rmtree(p, ignore_errors=True)


def test_spool_file_planted_as_hardlink_is_replaced_not_truncated(tree, alice, victim):
    """The spool is world-writable: a name planted there (symlink or hard link to someone else's file) is
    unlinked and created afresh, never truncated or chowned through."""
    from cbatch.emulator import momproc
    spool = tree.parent / (tree.name + "-spool")
    spool.mkdir(mode=0o1777)
    os.chmod(spool, 0o1777)
    try:
        target = victim / "precious"
        os.link(target, spool / "1.OU")
        os.symlink(str(target), spool / "1.ER")
        for name in ("1.OU", "1.ER"):
            momproc.write_owned(str(spool / name), b"", alice.uid, alice.gid, 0o600)
            st = os.lstat(spool / name)
            assert stat.S_ISREG(st.st_mode) and st.st_uid == alice.uid and st.st_nlink == 1
        assert_intact(victim) and os.stat(target).st_uid == 0
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def test_minus_v_and_minus_V_never_copy_roots_environment(alice, monkeypatch):
    import argparse
    from cbatch.emulator import localcmd as local
    monkeypatch.setenv("CBT_ROOT_SECRET", "s3cr3t")
    args = argparse.Namespace(queue=None, resources=[], variables=["CBT_ROOT_SECRET", "GIVEN=1"], name=None)
    script = b"#!/bin/bash\n#PBS -V\n#PBS -v CBT_ROOT_SECRET\necho\n"
    req = local._request(script, args, local.submit_environ(alice.uid))
    assert req.variables == {"GIVEN": "1"}
    assert "s3cr3t" not in repr(req)
    # root's own job: qsub run by root exports root's environment, as TORQUE would
    req = local._request(script, args, local.submit_environ(0))
    assert req.variables["CBT_ROOT_SECRET"] == "s3cr3t"
