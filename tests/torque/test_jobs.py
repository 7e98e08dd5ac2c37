"""Jobs submitted with the real qsub, run by the real pbs_mom through cbatch's installed hooks.

Queue ``batch`` is native by default, ``short`` runs in cbatch-test/debian:12 by default (kill_delay 5).
Everything is read back the way a user sees it: ``qstat -f`` and the delivered .o/.e files.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from trq import instance_containers

DEBIAN = "cbatch-test/debian:12"
BUSYBOX = "cbatch-test/busybox:1"


@pytest.fixture
def wd(torque, alice):
    path = torque.workdir(alice)
    yield path
    torque.cleanup(path)


def test_identity_in_container(torque, cbatchd, alice, wd):
    job = torque.qsub(alice, "#!/bin/bash\n#PBS -N ident\n"
                      "test -e /.cbatch && echo contained\nid -u; id -g; id -G | tr ' ' '\\n' | sort -n | "
                      "tr '\\n' ' '; echo; echo $HOME; umask; echo $PBS_JOBID; echo $PBS_O_WORKDIR; pwd\n",
                      ["-q", "short"], wd)
    r = torque.wait(job)
    assert r.exit_status == 0, (r.attrs, r.stderr)
    groups = " ".join(str(g) for g in sorted(alice.groups)) + " "
    assert r.stdout.decode().splitlines() == [
        "contained", str(alice.uid), str(alice.gid), groups, alice.home, "0077", job, str(wd), alice.home], r.stderr
    assert r.stderr == b""
    assert r.attrs["queue"] == "short" and r.attrs["euser"] == alice.name
    assert not instance_containers(cbatchd.instance, job)


def test_identity_native(torque, alice, wd):
    job = torque.qsub(alice, "#!/bin/bash\ntest -e /.cbatch && echo contained\nid -u; id -g; umask\n", [], wd)
    r = torque.wait(job)
    assert (r.exit_status, r.stdout.decode().splitlines()) == (0, [str(alice.uid), str(alice.gid), "0077"]), r.stderr


@pytest.mark.parametrize("body,status", [
    ("exit 0", 0),
    ("exit 7", 7),
    ("kill -TERM $$", 128 + 15),
    ("kill -KILL $$", 128 + 9),
])
def test_exit_status_in_container(torque, cbatchd, alice, wd, body, status):
    job = torque.qsub(alice, f"#!/bin/bash\necho before\n{body}\necho after\n", ["-q", "short"], wd)
    r = torque.wait(job)
    assert (r.exit_status, r.stdout) == (status, b"before\n"), (r.attrs, r.stderr)
    assert not instance_containers(cbatchd.instance, job)


def test_refusal_125_missing_image(torque, alice, wd):
    """An allowed image name (the glob passes the submit filter) that is not on the node: 125, one line."""
    job = torque.qsub(alice, "#!/bin/bash\n#CBATCH --image=cbatch-test/absent:1\necho ran\n", [], wd)
    r = torque.wait(job)
    lines = r.stderr.decode().splitlines()
    assert r.exit_status == 125 and r.stdout == b"", (r.attrs, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("cbatch: image: ") and "cbatch-test/absent:1" in lines[0], lines


def test_refusal_126_shell_not_executable(torque, alice, wd):
    """#PBS -S naming a file that exists in the image but cannot be executed: 126, one line."""
    job = torque.qsub(alice, "#!/bin/bash\n#PBS -S /etc/passwd\necho ran\n", ["-q", "short"], wd)
    r = torque.wait(job)
    lines = r.stderr.decode().splitlines()
    assert r.exit_status == 126 and r.stdout == b"", (r.attrs, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("cbatch: ") and "/etc/passwd" in lines[0], lines


def test_refusal_127_shell_missing_in_image(torque, alice, wd):
    """alice's login shell /bin/bash is not in the noshell image: 127, one line."""
    job = torque.qsub(alice, "#!/bin/bash\n#CBATCH --image=cbatch-test/noshell:1\necho ran\n", [], wd)
    r = torque.wait(job)
    lines = r.stderr.decode().splitlines()
    assert r.exit_status == 127 and r.stdout == b"", (r.attrs, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("cbatch: ") and "/bin/bash" in lines[0], lines


def test_split_output_byte_exact(torque, alice, wd):
    body = ("#!/bin/bash\nprintf 'o1\\n'; printf 'e1\\n' >&2; printf '\\x00\\xff\\r\\n'; "
            "printf 'e2 no newline' >&2; printf 'o-end'\n")
    job = torque.qsub(alice, body, ["-q", "short"], wd)
    r = torque.wait(job)
    assert r.exit_status == 0, r.attrs
    assert r.stdout == b"o1\n\x00\xff\r\no-end"
    assert r.stderr == b"e1\ne2 no newline"


def test_100mb_stream_byte_exact(torque, alice, wd):
    """100 MB (a reproducible stream of text lines) through the container into the .o file."""
    n = 100 * 1024 * 1024
    body = f"#!/bin/bash\nyes 'cbatch 0123456789 abcdefghijklmnopqrstuvwxyz' | head -c {n}\n"
    job = torque.qsub(alice, body, ["-q", "short"], wd)
    r = torque.wait(job, timeout=300)
    assert r.exit_status == 0, (r.attrs, r.stderr)
    line = b"cbatch 0123456789 abcdefghijklmnopqrstuvwxyz\n"
    expected = (line * (n // len(line) + 1))[:n]
    assert len(r.stdout) == n
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert r.stderr == b""


def test_arguments_and_dollar0(torque, alice, wd):
    job = torque.qsub(alice, '#!/bin/bash\necho "0=$0"; echo "n=$#"; for a in "$@"; do echo "[$a]"; done\n',
                      ["-q", "short", "-F", "argA 'b c'"], wd)
    r = torque.wait(job)
    lines = r.stdout.decode().splitlines()
    assert r.exit_status == 0, r.stderr
    assert lines[0] == f"0={torque.home}/mom_priv/jobs/{job}.SC", lines
    # The -F string is appended to the stdin line the shell reads: the shell's own quoting applies.
    assert lines[1:] == ["n=2", "[argA]", "[b c]"], lines


def test_cbatch_image_variable_overrides(torque, carol):
    wd = torque.workdir(carol)
    try:
        job = torque.qsub(carol, f"#!/bin/sh\n#CBATCH --image={DEBIAN}\nhead -1 /etc/os-release; "
                          "echo $CBATCH_IMAGE; test -x /bin/bash || echo nobash\n",
                          ["-v", f"CBATCH_IMAGE={BUSYBOX}"], wd)
        r = torque.wait(job)
        assert r.exit_status == 0, r.stderr
        assert r.stdout.decode().splitlines()[-2:] == [BUSYBOX, "nobash"], r.stdout
    finally:
        torque.cleanup(wd)


@pytest.mark.parametrize("directive,shell", [("#PBS -S /bin/sh\n", "/bin/sh"), ("", "/bin/bash")])
def test_pbs_S_chooses_the_shell(torque, alice, wd, directive, shell):
    """The -S shell (else the login shell) reads the stdin line and runs the script by path, so the script's
    own shebang still applies: the script's parent is the shell."""
    job = torque.qsub(alice, f"#!/bin/bash\n{directive}tr '\\0' ' ' < /proc/$PPID/cmdline; echo\n"
                      "echo bash=${BASH_VERSION:+yes}\n", ["-q", "short"], wd)
    r = torque.wait(job)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().splitlines() == [f"{shell} ", "bash=yes"], r.stdout
    assert r.attrs.get("Shell_Path_List", "") == directive[7:].strip()


def test_twenty_concurrent_jobs(torque, cbatchd, alice, bob, wd):
    """20 jobs at once (np=2: TORQUE runs 2 at a time): every status and byte exact, no container left."""
    jobs = {}
    for i in range(20):
        user = alice if i % 2 else bob
        d = wd if user is alice else torque.workdir(bob)
        queue = "short" if i % 3 else "batch"
        image = "" if queue == "short" or i % 2 else f"#CBATCH --image={DEBIAN}\n"
        jid = torque.qsub(user, f"#!/bin/bash\n{image}echo job-{i}-$(id -un); echo err-{i} >&2; exit {i}\n",
                          ["-q", queue], d, name=f"j{i}.sh")
        jobs[jid] = (i, user, d)
    for jid, (i, user, d) in jobs.items():
        r = torque.wait(jid, timeout=600)
        assert (r.exit_status, r.stdout, r.stderr) == (i, f"job-{i}-{user.name}\n".encode(), f"err-{i}\n".encode()), \
            (jid, r.attrs)
        assert not instance_containers(cbatchd.instance, jid)
    for _, (_, user, d) in jobs.items():
        if user is not alice:
            torque.cleanup(d)
