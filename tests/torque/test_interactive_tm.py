"""Interactive jobs (``qsub -I``, through a pty) and TM tasks (``pbsdsh``) on the real pbs_mom with cbatch's
hooks: the required behaviour. How the real mom starts them is recorded in test_mom_facts.py
(test_interactive_job_as_recorded, test_tm_task_as_recorded): for interactive jobs the starter is not the
session leader (a pbs_mom child holding the pty is), TM tasks come as ``[starter, cmd, args...]`` in a
session of their own whose parent is pbs_mom."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import uuid

import pytest

from trq import instance_containers, qsub_interactive, wait_until


@pytest.fixture
def wd(torque, alice):
    path = torque.workdir(alice)
    yield path
    torque.cleanup(path)


# Plain TORQUE 6.1 records exit_status 265 for a `qsub -I` job whose shell ran `exit 5` (observed without
# cbatch's hooks: torque-up --no-hooks; docs/torque-facts.md), and under load sometimes 0: the interactive
# job is three processes of the mom's own (reader, writer, shell; start_exec.c catchinter()), and which of
# them ends first decides between the reader's exit(0) and the SIGKILL (256 + 9). Neither is the shell's
# own status, so the job must record one of TORQUE's two, never a status of cbatch's (125, 127, 1).
INTERACTIVE_EXITS = ("265", "0")


def test_interactive_native(torque, alice, wd):
    out, status, job = qsub_interactive(torque, alice, ["-q", "batch", "-l", "walltime=00:02:00"],
                                        b"test -e /.cbatch || echo native-$((6*7)); tty; exit 5\n", wd)
    assert job and b"native-42" in out and b"/dev/pts/" in out, out
    assert b"cbatch:" not in out, out
    attrs = torque.wait_state(job, "C", 60)
    assert attrs["exit_status"] in INTERACTIVE_EXITS, attrs


def test_interactive_in_container(torque, cbatchd, alice, wd):
    out, status, job = qsub_interactive(torque, alice, ["-q", "short", "-l", "walltime=00:02:00"],
                                        b"test -e /.cbatch && echo contained-$((6*7)); tty; exit 4\n", wd)
    assert job and b"contained-42" in out and b"/dev/pts/" in out, out
    assert b"cbatch:" not in out, out
    attrs = torque.wait_state(job, "C", 60)
    assert attrs["exit_status"] in INTERACTIVE_EXITS, attrs
    assert not instance_containers(cbatchd.instance, job)


def test_pbsdsh_task_native(torque, alice, wd):
    job = torque.qsub(alice, f"#!/bin/bash\n{torque.bin('pbsdsh')} -u /bin/echo x\necho rc=$?\n", [], wd)
    r = torque.wait(job)
    assert r.exit_status == 0 and r.stdout == b"x\nrc=0\n", (r.stdout, r.stderr)
    assert b"cbatch:" not in r.stderr and b"exit status" not in r.stderr, r.stderr


def test_pbsdsh_task_runs_in_the_jobs_container(torque, cbatchd, alice, wd):
    """A container job's own pbsdsh (by its host path: the TORQUE client is mounted from the running
    pbs_mom's PREFIX) reaches the mom through the job's TM relay, and the task it spawns runs in that job's
    container (it sees /.cbatch and the job's image)."""
    job = torque.qsub(alice, f"#!/bin/bash\n{torque.bin('pbsdsh')} -u /bin/sh -c "
                      "'test -e /.cbatch && echo task-contained; head -1 /etc/os-release'\necho rc=$?\n",
                      ["-q", "short"], wd)
    r = torque.wait(job)
    assert r.exit_status == 0, (r.stdout, r.stderr)
    assert r.stdout.decode().splitlines()[:2] == ["task-contained", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'], \
        (r.stdout, r.stderr)
    assert not instance_containers(cbatchd.instance, job)


def test_a_wrong_cookie_gets_nothing_and_mom_logs_are_root_only(torque, cbatchd, alice, wd):
    """TM through the relay is checked by pbs_mom as for a native job: a wrong PBS_JOBCOOKIE spawns nothing.
    The mom logs the real cookie when it sees a wrong one, so mom_logs must not be readable by users."""
    job = torque.qsub(alice, f"#!/bin/bash\nPBS_JOBCOOKIE=00000000000000000000000000000000 "
                      f"{torque.bin('pbsdsh')} -u /bin/sh -c 'echo spawned'\necho rc=$?\n", ["-q", "short"], wd)
    r = torque.wait(job)
    assert b"spawned" not in r.stdout and b"rc=" in r.stdout, (r.stdout, r.stderr)
    logs = os.path.join(torque.home, "mom_logs")
    assert stat.S_IMODE(os.stat(logs).st_mode) == 0o700
    read = subprocess.run(["runuser", "-u", alice.name, "--", "ls", logs], capture_output=True)
    assert read.returncode != 0 and b"Permission denied" in read.stderr, read


def test_pbsdsh_after_a_cbatchd_restart(torque, cbatchd, alice, wd):
    """The relay lives in cbatchd: after a restart the reattached session re-creates it, and the job's next
    pbsdsh works. The job waits for a file the test creates once the starter has reattached."""
    tag = uuid.uuid4().hex[:12]
    up, go = os.path.join(alice.home, f"tmrelay-up-{tag}"), os.path.join(alice.home, f"tmrelay-go-{tag}")
    job = torque.qsub(alice, f"#!/bin/bash\ntouch {up}\nwhile [ ! -e {go} ]; do sleep 0.2; done\n"
                      f"{torque.bin('pbsdsh')} -u /bin/sh -c 'test -e /.cbatch && echo task-after-restart'\n"
                      "echo rc=$?\n", ["-q", "short"], wd)
    try:
        assert wait_until(lambda: os.path.exists(up), 120), "the job never started"
        before = cbatchd.log_size()
        cbatchd.restart()

        def relayed_again():
            new = cbatchd.log_since(before)
            j = re.escape(job)
            return re.search(rf"job {j}: container [\w-]+: pid \d+ reattached.*job {j}: container [\w-]+: TM relay on",
                             new, re.S)
        assert wait_until(relayed_again, 60), cbatchd.log()
        open(go, "w").close()
        r = torque.wait(job)
        assert r.exit_status == 0 and r.stdout == b"task-after-restart\nrc=0\n", (r.stdout, r.stderr)
    finally:
        for path in (up, go):
            if os.path.exists(path):
                os.unlink(path)
