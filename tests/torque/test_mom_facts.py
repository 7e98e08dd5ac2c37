"""How the real pbs_mom runs the hooks, recorded with probe hooks (tests/torque/probe.py) that log argv, ids,
session, stdin, descriptors, umask, cwd, environment and limits and then exec cbatch's real hooks; each claim
of docs/torque-facts.md (and of the emulator, cbatch/emulator/) is asserted here once against the real mom.

The module switches the mom to the probes the way README.md tells an admin to apply a mom config change
(``momctl -s``, then start ``pbs_mom``) and brings the normal set-up back at the end (scripts/torque-up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

import probe
from trq import wait_until

OUT = "/var/tmp/cbatch-trq-probe"


def restart_mom(torque) -> None:
    """README's restart: momctl -s, wait for the mom to exit, start pbs_mom, wait until the node is free."""
    lock = os.path.join(torque.home, "mom_priv", "mom.lock")
    pid = int(open(lock).read().strip("\0\n ") or 0)
    subprocess.run([torque.bin("momctl"), "-s"], check=True, capture_output=True)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30), "pbs_mom did not stop on momctl -s"
    subprocess.run([torque.bin("pbs_mom")], check=True, capture_output=True)
    node_free(torque)


def node_free(torque, timeout=120) -> None:
    def free():
        out = subprocess.run([torque.bin("pbsnodes"), torque.host], capture_output=True, text=True).stdout
        return "state = free" in out
    assert wait_until(free, timeout, 1), "node not free after the mom restart"


@pytest.fixture(scope="module")
def probed(torque_ctl, users):
    torque = torque_ctl.up("plain")
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    os.chmod(OUT, 0o1777)
    mom_priv = os.path.join(torque.home, "mom_priv")
    from cbatch.admin import install
    saved = {}
    try:
        for kind in ("prologue", "epilogue"):
            real = saved[kind] = os.path.join(torque.libexec, f"real-{kind}")
            shutil.copy2(os.path.join(mom_priv, kind), real)
            install.write_file(os.path.join(mom_priv, kind), probe.text(OUT, kind, real), 0o500)
        starter = os.path.join(torque.libexec, "probe-starter")
        install.write_file(starter, probe.text(OUT, "starter", os.path.join(torque.libexec, "job_starter")), 0o755)
        cfg = os.path.join(mom_priv, "config")
        lines = [ln for ln in open(cfg).read().splitlines() if not ln.startswith("$job_starter ")]
        install.write_file(cfg, "\n".join(lines + [f"$job_starter {starter}"]) + "\n", 0o644)
        restart_mom(torque)
        yield torque
    finally:
        for kind, real in saved.items():          # cbatch's own shims back, then the documented set-up
            shutil.copy2(real, os.path.join(mom_priv, kind))
        torque_ctl.current = None
        torque_ctl.up("plain")


@pytest.fixture
def wd(probed, alice):
    path = probed.workdir(alice)
    yield path
    probed.cleanup(path)


RES = "nodes=1:ppn=1,walltime=00:01:00,mem=100mb"
# Where the emulator is known to differ (reported, not yet changed): the real prologue inherits pipes on
# descriptors 9, 11 and 14; the emulator's prologue gets only 0, 1, 2. Listed so that any other drift, or a
# fix, makes this test fail.
KNOWN_DIFFERENCES = {"prologue.extra_fds"}
VOLATILE = {"PBS_JOBCOOKIE", "PWD", "SHLVL", "_"}
# Set from the submitter's environment or the site (qsub copies MAIL, torque.cfg's SUBMITFILTER): not the mom's.
SUBMITTER = {"PBS_O_MAIL", "PBS_O_SUBMIT_FILTER"}


def _kind(target):
    if target is None:
        return None
    if target.startswith("pipe:"):
        return "pipe"
    if target == "/dev/null":
        return "null"
    if target.startswith("/dev/pts/") or target == "/dev/tty":
        return "tty"
    if target.endswith(".OU"):
        return "spool.OU"
    if target.endswith(".ER"):
        return "spool.ER"
    return "other"


def norm(rec, user, home_dir):
    """What the emulator must reproduce, independent of pids, job numbers, paths and the mom's home."""
    fds = {int(k): v for k, v in rec["fds"].items()}
    job = rec["env"].get("PBS_JOBID") or rec["argv"][1]
    return {
        "argc": len(rec["argv"]),
        "argv_tail": [a.replace(home_dir, "PBS_HOME").replace(job, "JOBID") for a in rec["argv"][1:]
                      if a != job and not a.isdigit()][-3:],
        "resuid": rec["resuid"], "resgid": rec["resgid"], "groups": rec["groups"],
        "session_leader": rec["pid"] == rec["pgid"] == rec["sid"],
        "umask": oct(rec["umask"]), "cwd": rec["cwd"].replace(home_dir, "PBS_HOME"),
        "fd0": _kind(fds.get(0)), "fd1": _kind(fds.get(1)), "fd2": _kind(fds.get(2)),
        "stdin_tty": rec["stdin_tty"], "extra_fds": sorted(n for n in fds if n > 2),
        "env_keys": sorted(set(rec["env"]) - VOLATILE - SUBMITTER),
        "rlimits": {k: v for k, v in rec["rlimits"].items() if k != "RLIMIT_AS"},
    }


@pytest.fixture(scope="module")
def batch_job(probed, users):
    """One job as torque-mom.md's example: nodes=1:ppn=1,walltime=00:01:00,mem=100mb -N name -v EXITCODE=3."""
    alice = users["cbt-alice"]
    wd = probed.workdir(alice)
    job = probed.qsub(alice, "#!/bin/bash\necho hi\nexit $EXITCODE\n", ["-l", RES, "-N", "name", "-v", "EXITCODE=3"], wd)
    r = probed.wait(job)
    recs = {k: probe.records(OUT, k, job) for k in ("prologue", "starter", "epilogue")}
    yield job, r, recs, wd
    probed.cleanup(wd)


def test_starter_as_recorded(probed, batch_job, alice):
    job, r, recs, wd = batch_job
    assert (r.exit_status, r.stdout, r.stderr) == (3, b"hi\n", b""), r.attrs
    (st,) = recs["starter"]
    assert st["argv"][1:] == [alice.shell]
    assert st["resuid"] == [alice.uid] * 3 and st["resgid"] == [alice.gid] * 3
    assert st["groups"] == sorted(alice.groups)
    assert st["pid"] == st["pgid"] == st["sid"] == int(r.attrs["session_id"])
    assert st["parent"] == "pbs_mom" and st["umask"] == 0o077 and st["cwd"] == alice.home
    fds = {int(k): v for k, v in st["fds"].items()}
    assert _kind(fds[0]) == "pipe" and not st["stdin_tty"]
    assert fds[1] == f"{probed.home}/spool/{job}.OU" and fds[2] == f"{probed.home}/spool/{job}.ER"
    assert st["rlimits"]["RLIMIT_DATA"] == [100 << 20] * 2 and st["rlimits"]["RLIMIT_RSS"] == [100 << 20] * 2
    assert st["rlimits"]["RLIMIT_NOFILE"] == [20000, 20000] and st["rlimits"]["RLIMIT_CORE"][0] == 0
    env = st["env"]
    assert env["PBS_ENVIRONMENT"] == "PBS_BATCH" and env["ENVIRONMENT"] == "BATCH"
    assert env["PBS_JOBID"] == job and env["EXITCODE"] == "3" and env["PBS_O_WORKDIR"] == str(wd)
    assert env["TMPDIR"] == f"/tmp/{job}" and env["PBS_NODEFILE"] == f"{probed.home}/aux//{job}"
    assert env["PATH"] == "/bin:/usr/bin" and env["PBS_WALLTIME"] == "60"


def test_prologue_and_epilogue_as_recorded(probed, batch_job, alice):
    job, r, recs, wd = batch_job
    (pro,), (st,), (epi,) = recs["prologue"], recs["starter"], recs["epilogue"]
    script = f"{probed.home}/mom_priv/jobs/{job}.SC"
    assert pro["argv"][1:] == [job, alice.name, alice.group, "name", RES + ",neednodes=1:ppn=1", "batch", "", script]
    assert epi["argv"][1:] == [job, alice.name, alice.group, "name", str(st["pid"]), RES + ",neednodes=1:ppn=1",
                               epi["argv"][7], "batch", "", "3", script]
    assert epi["argv"][7].startswith("cput=")
    for rec in (pro, epi):
        assert rec["resuid"] == [0, 0, 0] and rec["resgid"] == [0, 0, 0]
        assert rec["cwd"] == f"{probed.home}/mom_priv" and not rec["stdin_tty"]
        assert _kind(rec["fds"]["0"]) == "null"
        assert set(rec["env"]) - VOLATILE == {"LANG", "PATH", "PBS_MSHOST", "PBS_NODEFILE", "PBS_NODENUM", "PBS_NP",
                                             "PBS_NUM_NODES", "PBS_NUM_PPN", "PBS_O_WORKDIR", "PBS_RESOURCE_NODES",
                                             "TMPDIR"}     # TMPDIR: with $tmpdir in the mom config
    # The prologue runs in the child that then execs the starter: its parent is the starter-to-be.
    assert pro["ppid"] == st["pid"] == int(r.attrs["session_id"])
    assert (pro["umask"], epi["umask"]) == (0o077, 0o022)


def test_emulator_matches_the_real_mom(probed, batch_job, alice, tmp_path):
    """The same probes through cbatch's pbs_mom emulator (cbatch/emulator/) give the same records, so the
    emulator the integration suite relies on cannot drift from the real mom."""
    from cbatch.emulator.local import Mom
    job, r, recs, wd = batch_job
    out = f"{OUT}/emu"
    os.makedirs(out, exist_ok=True)
    os.chmod(out, 0o1777)
    root = f"/var/spool/cbatch-trq-emu-{os.getpid()}"
    try:
        mom = Mom(root, prologue=probe.text(out, "prologue", None), epilogue=probe.text(out, "epilogue", None),
                  starter=probe.text(out, "starter", None))
        ejob = mom.submit(b"#!/bin/bash\necho hi\nexit $EXITCODE\n", alice.name, resources=RES, name="name",
                          variables={"EXITCODE": "3"}, tmpdir=True, workdir=str(wd))
        er = ejob.wait(60)
        assert (er.exit_status, er.stdout) == (3, b"hi\n"), (er, os.listdir(out))
        diffs = {}
        for kind in ("prologue", "starter", "epilogue"):
            (real,), (emu,) = recs[kind], probe.records(out, kind, ejob.job_id)
            a, b = norm(real, alice, probed.home), norm(emu, alice, root)
            diffs.update({f"{kind}.{k}": (a[k], b[k]) for k in a if a[k] != b[k]})
        assert set(diffs) == KNOWN_DIFFERENCES, "real mom vs emulator (real, emulator): " + repr(diffs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_interactive_job_as_recorded(probed, alice, wd):
    """qsub -I: the prologue and epilogue run (8 and 11 arguments); the starter gets [starter, shell] with the
    job's pty on 0, 1 and 2 and no stdin line; it is NOT the session leader: a pbs_mom child holding the pty
    is (pid = session_id, the prologue's parent), and the starter is its child, in its process group, which is
    the terminal's foreground group. PBS_ENVIRONMENT=PBS_INTERACTIVE, no ENVIRONMENT, TERM from qsub."""
    from trq import qsub_interactive
    out, status, job = qsub_interactive(probed, alice, ["-q", "batch", "-l", "walltime=00:01:00"], b"exit 5\n", wd)
    assert job, out
    attrs = probed.wait_state(job, "C", 60)
    assert attrs.get("interactive") == "True"
    sid = int(attrs["session_id"])
    (pro,), (st,) = probe.records(OUT, "prologue", job), probe.records(OUT, "starter", job)
    assert wait_until(lambda: probe.records(OUT, "epilogue", job), 30)
    (epi,) = probe.records(OUT, "epilogue", job)
    assert len(pro["argv"]) == 9 and pro["argv"][4] == "STDIN" and len(epi["argv"]) == 12
    assert pro["ppid"] == sid and epi["argv"][5] == str(sid)
    assert pro["groups"] == [0] and epi["groups"] == [0]          # unlike batch jobs: root's groups only
    assert st["argv"][1:] == [alice.shell] and st["pid"] != sid
    assert st["ppid"] == sid and st["sid"] == sid and st["pgid"] == sid and st["tcpgrp"] == sid
    assert st["stdin_tty"] and {st["fds"][k] for k in ("0", "1", "2")} == {st["fds"]["0"]}
    assert st["fds"]["0"].startswith("/dev/pts/")
    assert st["env"]["PBS_ENVIRONMENT"] == "PBS_INTERACTIVE" and "ENVIRONMENT" not in st["env"]
    assert st["cwd"] == alice.home and st["umask"] == 0o077
    assert _kind(epi["fds"]["1"]) == "null"                        # the epilogue's output goes nowhere


def test_tm_task_as_recorded(probed, alice, wd):
    """pbsdsh -u /bin/echo x from a job: the mom starts the task through $job_starter with the task's own argv,
    stdin /dev/null, stdout/stderr the job's spool files, in a NEW session whose parent is pbs_mom itself (not
    the job's session), cwd $HOME, no prologue; PBS_TASKNUM=2 and no USER/LOGNAME/SHELL/PBS_NP/PBS_WALLTIME."""
    job = probed.qsub(alice, f"#!/bin/bash\n{probed.bin('pbsdsh')} -u /bin/echo x\necho rc=$?\n", [], wd)
    r = probed.wait(job)
    starters = probe.records(OUT, "starter", job)
    assert len(starters) == 2 and len(probe.records(OUT, "prologue", job)) == 1, starters
    shell, task = starters
    assert task["argv"][1:] == ["/bin/echo", "x"]
    assert _kind(task["fds"]["0"]) == "null" and not task["stdin_tty"]
    assert task["fds"]["1"].endswith(f"/spool/{job}.OU") and task["fds"]["2"].endswith(f"/spool/{job}.ER")
    assert task["pid"] == task["pgid"] == task["sid"] != int(r.attrs["session_id"])
    assert task["ppid"] == shell["ppid"] and task["parent"] == "pbs_mom"
    assert task["resuid"] == [alice.uid] * 3 and task["cwd"] == alice.home and task["umask"] == 0o077
    env = task["env"]
    assert env["PBS_JOBID"] == job and env["PBS_TASKNUM"] == "2" and env["PBS_ENVIRONMENT"] == "PBS_BATCH"
    assert not {"USER", "LOGNAME", "SHELL", "PBS_NP", "PBS_WALLTIME"} & set(env)
