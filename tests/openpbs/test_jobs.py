"""Jobs submitted with OpenPBS's real qsub, run by the real pbs_mom through cbatch's PBS hooks.

Queue ``workq`` is native by default, ``short`` runs in cbatch-test/debian:12 by default (kill_delay 5).
Everything is read back the way a user sees it: ``qstat -xf`` and the delivered .o/.e files.
"""

from __future__ import annotations

import pytest

from trq import instance_containers, wait_until

DEBIAN = "cbatch-test/debian:12"
BUSYBOX = "cbatch-test/busybox:1"


def test_identity_in_container(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, "#!/bin/bash\n#PBS -N ident\n"
                   "test -e /.cbatch && echo contained\nid -u; id -g; id -G | tr ' ' '\\n' | sort -n | "
                   "tr '\\n' ' '; echo; echo $HOME; umask; echo $PBS_JOBID; echo $PBS_O_WORKDIR\n",
                   ["-q", "short"], wd)
    r = pbs.wait(job)
    assert r.exit_status == 0, (r.attrs, r.stderr)
    groups = " ".join(str(g) for g in sorted(alice.groups)) + " "
    assert r.stdout.decode().splitlines() == [
        "contained", str(alice.uid), str(alice.gid), groups, alice.home, "0077", job, str(wd)], r.stderr
    assert r.stderr == b""
    assert r.attrs["queue"] == "short" and r.attrs["euser"] == alice.name
    assert not instance_containers(cbatchd.instance, job)
    assert f"registered job {job}" in cbatchd.log() or job in cbatchd.log()


def test_native_queue_runs_natively(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, "#!/bin/bash\ntest -e /.cbatch && echo contained\nid -u; echo $0\nexit 3\n", [], wd)
    r = pbs.wait(job)
    assert (r.exit_status, r.stdout.decode().splitlines()[0]) == (3, str(alice.uid)), (r.attrs, r.stderr)
    assert "contained" not in r.stdout.decode()


@pytest.mark.parametrize("body,status", [("exit 0", 0), ("exit 7", 7), ("kill -KILL $$", 128 + 9)])
def test_exit_status_and_split_output(pbs, cbatchd, alice, wd, body, status):
    job = pbs.qsub(alice, f"#!/bin/bash\necho out\necho err >&2\n{body}\necho after\n", ["-q", "short"], wd)
    r = pbs.wait(job)
    # The login shell runs the .SC as its child: after a SIGKILL it reports "Killed" itself, as without cbatch.
    assert (r.exit_status, r.stdout, r.stderr.splitlines()[0]) == (status, b"out\n", b"err"), (r.attrs, r.stderr)
    assert not instance_containers(cbatchd.instance, job)


def test_image_from_qsub_v_and_pbs_pro_name(pbs, cbatchd, alice, wd):
    body = "#!/bin/sh\ncat /etc/os-release | grep -c . >/dev/null; busybox true && echo busybox\n"
    for var in ("CBATCH_IMAGE", "CONTAINER_IMAGE"):
        job = pbs.qsub(alice, body, ["-q", "short", "-v", f"{var}={BUSYBOX}"], wd, name=f"{var}.sh")
        r = pbs.wait(job)
        assert (r.exit_status, r.stdout) == (0, b"busybox\n"), (var, r.attrs, r.stderr)


def test_image_directive(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, f"#!/bin/sh\n#CBATCH --image={BUSYBOX}\nbusybox true && echo busybox\n", [], wd)
    r = pbs.wait(job)
    assert (r.exit_status, r.stdout) == (0, b"busybox\n"), (r.attrs, r.stderr)


def test_refused_image_one_line_in_e_file(pbs, cbatchd, alice, wd):
    # queuejob lets the first through only when it cannot tell; cbatchd refuses at start.
    r = pbs.qsub_raw(alice, "#!/bin/sh\necho never\n", ["-q", "short", "-v", "CBATCH_IMAGE=evil/image:1"], wd)
    assert r.returncode != 0, r
    assert b"cbatch:" in r.stderr and b"evil/image:1" in r.stderr, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr


def test_qsub_exec_program_in_container(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, None, ["-q", "short", "--", "/bin/sh", "-c",
                                 "test -e /.cbatch && echo contained; echo $0 $1; exit 9", "zero", "one"], wd)
    r = pbs.wait(job)
    assert (r.exit_status, r.stdout) == (9, b"contained\nzero one\n"), (r.attrs, r.stderr)


def test_qdel_removes_container(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, "#!/bin/bash\necho started\nsleep 300\n", ["-q", "short"], wd)
    pbs.session_of(job)
    assert wait_until(lambda: instance_containers(cbatchd.instance, job), 60), cbatchd.log()[-3000:]
    pbs.qdel(alice, job)
    r = pbs.wait(job)
    assert r.exit_status == 256 + 15, (r.attrs, r.stderr)
    assert r.stdout == b"started\n"
    assert wait_until(lambda: not instance_containers(cbatchd.instance, job), 30)


def test_walltime(pbs, cbatchd, alice, wd):
    job = pbs.qsub(alice, "#!/bin/bash\necho started\nsleep 300\n", ["-q", "short", "-l", "walltime=00:00:05"], wd)
    r = pbs.wait(job)
    assert r.stdout == b"started\n" and r.exit_status != 0, (r.attrs, r.stderr)
    assert not instance_containers(cbatchd.instance, job)


def test_pbsdsh_task_of_native_job(pbs, cbatchd, alice, wd):
    # A TM task goes through the launch hook and the starter too; in a native job it runs natively, with
    # the task's own argv, as without cbatch. (pbsdsh inside a container job needs a TM path out of network
    # none: see docs/pbs.md.)
    job = pbs.qsub(alice, "#!/bin/bash\n/opt/pbs/bin/pbsdsh -- /usr/bin/printf '%s|' 'arg with space' two\n",
                   [], wd)
    r = pbs.wait(job)
    assert (r.exit_status, r.stdout) == (0, b"arg with space|two|"), (r.attrs, r.stderr)


def test_interactive_job_in_container_with_a_pty(pbs, cbatchd, alice, wd):
    from trq import qsub_interactive
    out, status, job = qsub_interactive(pbs, alice, ["-q", "short"],
                                        b"test -t 0 && test -e /.cbatch && echo in-container-$((6*7)); exit\n", wd)
    assert job, out
    assert b"in-container-42" in out, out
    assert status == 0, out
    assert wait_until(lambda: not instance_containers(cbatchd.instance, job), 30)


def test_install_hooks_is_idempotent(pbs, cbatchd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import conftest
    cbatch = str(Path(sys.executable).parent / "cbatch")
    argv = [cbatch, "install-hooks", "--pbs", "--pbs-exec", "/opt/pbs", "--libexec", conftest.LIBEXEC,
            "--config", str(cbatchd.config_path)]

    def hooks():
        out = subprocess.run(["/opt/pbs/bin/qmgr", "-c", "list hook"], capture_output=True, text=True, check=True)
        return sorted(line.split()[1] for line in out.stdout.splitlines() if line.startswith("Hook "))

    before = hooks()
    assert {"cbatch_exec", "cbatch_queuejob"} <= set(before) and "cbatch" not in before, before
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert hooks() == before
    starter = Path(conftest.LIBEXEC, "job_starter")
    assert starter.stat().st_uid == 0 and starter.stat().st_mode & 0o7777 == 0o755


def test_refused_directive_one_line_in_e_file(pbs, cbatchd, alice, wd):
    # OpenPBS gives queuejob no script: the #CBATCH image is refused by cbatchd at start, in the job's words.
    job = pbs.qsub(alice, "#!/bin/sh\n#CBATCH --image=evil/image:1\necho never\n", ["-q", "short"], wd)
    r = pbs.wait(job)
    assert r.stdout == b"" and r.exit_status != 0, (r.attrs, r.stderr)
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbatch: ") and "evil/image:1" in lines[0], r.stderr
    assert not instance_containers(cbatchd.instance, job)
