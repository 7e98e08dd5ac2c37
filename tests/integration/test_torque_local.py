"""``cbatch local``: the same emulator, driven from the command line, through the real daemon."""

from __future__ import annotations

import os
import subprocess
import sys

CBATCH = os.path.join(os.path.dirname(sys.executable), "cbatch")


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
