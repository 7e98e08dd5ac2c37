"""``cbatch local``: the same emulator, driven from the command line, through the real daemon."""

from __future__ import annotations

import os
import subprocess
import sys

CBATCH = os.path.join(os.path.dirname(sys.executable), "cbatch")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def test_cbatch_local_runs_script_through_daemon(daemon, alice, workdir):
    path = workdir / "job.sh"
    path.write_text("#!/bin/bash\n#CBATCH --image=cbatch-test/debian:12\n"
                    "echo \"out $1 $(id -un) $(test -e /.cbatch && echo contained)\"\necho err >&2\nexit 5\n")
    os.chown(path, alice.uid, alice.gid)
    p = subprocess.run([CBATCH, "local", "--user", alice.name, "--socket", daemon.socket, str(path), "a1"],
                       capture_output=True, cwd=str(workdir), timeout=120)
    assert p.returncode == 5, p.stderr
    assert p.stdout == f"out a1 {alice.name} contained\n".encode()
    assert p.stderr == b"err\n"


def test_cbatch_local_signal_status_and_failure(daemon, alice, workdir):
    path = workdir / "job.sh"
    path.write_text("#!/bin/bash\n#CBATCH --image=cbatch-test/nope:1\necho never\n")
    os.chown(path, alice.uid, alice.gid)
    p = subprocess.run([CBATCH, "local", "--user", alice.name, "--socket", daemon.socket, str(path)],
                       capture_output=True, cwd=str(workdir), timeout=120)
    assert p.returncode == 125
    assert p.stdout == b""
    assert p.stderr.decode().startswith("cbatch:") and len(p.stderr.splitlines()) == 1


def test_cbatch_local_refuses_non_root(alice, workdir):
    p = subprocess.run(["runuser", "-u", alice.name, "--", CBATCH, "local", "x.sh"], capture_output=True,
                       text=True, cwd=str(workdir), timeout=60)
    assert p.returncode != 0
    assert p.stderr.startswith("cbatch: cbatch local: must run as root") and len(p.stderr.splitlines()) == 1


def test_cbatch_local_honours_pbs_shell_for_a_bash_user(daemon, alice, workdir):
    # busybox has no bash: the example says #PBS -S /bin/sh, and pbs_mom starts [starter, /bin/sh] for it
    # although alice's login shell is /bin/bash.
    assert alice.shell == "/bin/bash"
    script = os.path.join(EXAMPLES, "hello-busybox.sh")
    p = subprocess.run([CBATCH, "local", "--user", alice.name, "--socket", daemon.socket, script],
                       capture_output=True, cwd=str(workdir), timeout=120)
    assert p.returncode == 0, p.stderr
    first = p.stdout.decode().splitlines()[0]
    assert first.startswith("hello from ") and first.endswith(f" as {alice.name} in cbatch-test/busybox:1")
    assert p.stderr == b""


def test_cbatch_local_reads_pbs_lines_and_its_options_override(daemon, alice, workdir):
    path = workdir / "opts.sh"
    path.write_text("#!/bin/bash\n#PBS -q debian -N fromscript\n#PBS -l nodes=1:ppn=2 -l walltime=00:05:00\n"
                    "#PBS -v FOO=script,BAR=kept\n"
                    "echo \"$PBS_QUEUE $PBS_JOBNAME $PBS_NUM_PPN $PBS_WALLTIME $FOO $BAR $CBATCH_IMAGE $0\"\n")
    os.chown(path, alice.uid, alice.gid)
    base = [CBATCH, "local", "--user", alice.name, "--socket", daemon.socket]
    p = subprocess.run(base + [str(path)], capture_output=True, cwd=str(workdir), timeout=120)
    assert p.returncode == 0, p.stderr
    words = p.stdout.decode().split()
    assert words[:7] == ["debian", "fromscript", "2", "300", "script", "kept", "cbatch-test/debian:12"]
    assert words[7].endswith(".SC")            # run by the shell from the stdin line, as pbs_mom does
    p = subprocess.run(base + ["-q", "batch", "-N", "cmd", "-l", "nodes=1:ppn=1", "-v", "FOO=cmd", str(path)],
                       capture_output=True, cwd=str(workdir), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().split()[:6] == ["batch", "cmd", "1", "300", "cmd", "kept"]


def test_cbatch_local_never_removes_a_tmpdir_the_job_named(daemon, alice, workdir):
    """Issue 9.9: ``#PBS -v TMPDIR=<root dir>`` made ``sudo cbatch local`` mount it rw and then remove it
    recursively as root (this removed a whole /etc). Now the mom's own /tmp/<jobid> replaces it."""
    import shutil
    import tempfile
    victim = tempfile.mkdtemp(prefix="cbt-victim-", dir="/var/spool")
    os.chmod(victim, 0o755)
    with open(os.path.join(victim, "precious"), "w") as fh:
        fh.write("keep\n")
    try:
        path = workdir / "tmp.sh"
        path.write_text(f"#!/bin/bash\n#PBS -v TMPDIR={victim}\n#CBATCH --image=cbatch-test/debian:12\n"
                        "echo \"T=$TMPDIR $(stat -c %U \"$TMPDIR\")\"\n")
        os.chown(path, alice.uid, alice.gid)
        p = subprocess.run([CBATCH, "local", "--user", alice.name, "--socket", daemon.socket, str(path)],
                           capture_output=True, cwd=str(workdir), timeout=120)
        assert p.returncode == 0, p.stderr
        line = p.stdout.decode().strip()
        assert line.startswith("T=/tmp/") and line.endswith(f" {alice.name}") and victim not in line
        assert not os.path.lexists(line[2:].split()[0])                  # the mom's own TMPDIR is gone
        with open(os.path.join(victim, "precious")) as fh:
            assert fh.read() == "keep\n"
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_cbatch_local_never_copies_roots_environment(daemon, alice, workdir):
    """``#PBS -V`` / ``#PBS -v NAME`` under ``sudo cbatch local`` copied root's environment (its secrets)
    into the user's job."""
    path = workdir / "env.sh"
    path.write_text("#!/bin/bash\n#PBS -V\n#PBS -v CBT_ROOT_SECRET\n#CBATCH --image=cbatch-test/debian:12\n"
                    "echo \"S=${CBT_ROOT_SECRET-unset}\"\n")
    os.chown(path, alice.uid, alice.gid)
    env = {**os.environ, "CBT_ROOT_SECRET": "root-token-5e1f"}
    p = subprocess.run([CBATCH, "local", "--user", alice.name, "--socket", daemon.socket, str(path)],
                       capture_output=True, cwd=str(workdir), timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"S=unset\n" and b"root-token" not in p.stdout + p.stderr
