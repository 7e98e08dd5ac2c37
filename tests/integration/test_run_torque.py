"""``cbatch run`` inside a Torque job (the pbs_mom emulator): it must behave like running the command directly.

The job scripts here run natively (queue ``batch``, no ``#CBATCH --image``); each ``cbatch run`` inside them
asks the daemon for a container, which authorises it by the job's session. stdin/stdout/stderr are the
caller's own descriptors, the exit status is the command's, signals reach the container, and a SIGKILLed
``cbatch run`` loses its container within 2 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from torque_helpers import job_containers, reattached, script, wait_until

CBATCH = str(Path(sys.executable).parent / "cbatch")     # this venv's cbatch: the code under test
IMG = "cbatch-test/busybox:1"


def _submit(mom, daemon, user, body, workdir=None, **kw):
    head = f"C={CBATCH}\n"
    where = {"initdir": str(workdir), "workdir": str(workdir)} if workdir else {}
    return mom.submit(script(head + body, image=None), user.name, variables={"CBATCH_SOCKET": daemon.socket},
                      **where, **kw)


def _pid_of(job, timeout=30.0) -> int:
    assert job.wait_output(b"ready", timeout=timeout), job.peek()
    m = re.search(rb"pid=(\d+)", job.peek()[0])
    assert m, job.peek()
    return int(m.group(1))


def test_pipes_exit_codes_and_stderr(mom, daemon, alice):
    job = _submit(mom, daemon, alice, f"""
echo hi | $C run --image {IMG} cat
printf 'a\\nb\\n' | $C run --image {IMG} -- wc -l | tr -d ' '
$C run --image {IMG} sh -c 'echo out-line; echo err-line >&2; exit 42'
echo rc=$?
$C run --image {IMG} sh -c 'kill -TERM $$'
echo rc=$?
$C run --image {IMG} id -u
""")
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["hi", "2", "out-line", "rc=42", "rc=143", str(alice.uid)]
    assert r.stderr.decode().splitlines() == ["err-line"]
    assert not job_containers(daemon.instance, job.job_id)


def test_native_queue_without_image_runs_directly(mom, daemon, alice):
    job = _submit(mom, daemon, alice, """
$C run sh -c 'echo native-$(id -u); test -e /.cbatch && echo in-container; exit 5'
echo rc=$?
$C run /nonexistent/cmd
echo rc=$?
""")
    r = job.wait(60)
    assert r.stdout.decode().splitlines() == [f"native-{alice.uid}", "rc=5", "rc=127"], r.stderr
    err = r.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("cbatch: cbatch run: cannot run the command"), err
    assert not job_containers(daemon.instance, job.job_id)


def test_byte_exact_files_and_pipes(mom, daemon, alice, workdir):
    data = bytes(range(256)) * 64 + os.urandom(3 << 20) + b"\0\r\n\xff no newline at the end"
    (workdir / "in.bin").write_bytes(data)
    os.chown(workdir / "in.bin", alice.uid, alice.gid)
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG} cat < in.bin > out-file.bin
cat in.bin | $C run --image {IMG} cat | cat > out-pipe.bin
echo done
""", workdir=workdir)
    r = job.wait(180)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == b"done\n", r.stderr
    assert (workdir / "out-file.bin").read_bytes() == data
    assert (workdir / "out-pipe.bin").read_bytes() == data


def test_piped_output_is_live(mom, daemon, alice):
    # stdout is a pipe (proxied by the daemon): each line must arrive when written, not at the end.
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG} sh -c 'echo one; sleep 2; echo two' | while read -r l; do echo "$(date +%s.%N) $l"; done
""")
    r = job.wait(60)
    stamps = [float(line.split()[0]) for line in r.stdout.decode().splitlines()]
    assert [line.split()[1] for line in r.stdout.decode().splitlines()] == ["one", "two"], r.stderr
    assert stamps[1] - stamps[0] >= 1.5, stamps


def test_interactive_stdin_is_live(mom, daemon, alice, workdir):
    fifo = workdir / "in.fifo"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, alice.uid, alice.gid)
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG} sh -c 'read a; echo got-$a; read b; echo got-$b; read c || echo eof' < in.fifo
echo rc=$?
""", workdir=workdir)
    result = {}

    def feed():
        # Opening the fifo blocks until the job opens its end: do it off the main thread.
        with open(fifo, "wb", buffering=0) as f:
            f.write(b"one\n")
            result["first"] = job.wait_output(b"got-one", timeout=60)
            f.write(b"two\n")
            result["second"] = job.wait_output(b"got-two", timeout=60)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    t.join(90)
    r = job.wait(120)
    assert result == {"first": True, "second": True}, r.stdout
    assert r.stdout.decode().splitlines() == ["got-one", "got-two", "eof", "rc=0"], r.stderr
    assert r.exit_status == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_reaches_container(mom, daemon, alice, sig):
    name = sig.name[3:]
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG} sh -c 'trap "echo got-{name}; exit 7" {name}; echo ready; while :; do sleep 0.1; done' &
pid=$!
echo pid=$pid
wait $pid
echo rc=$?
""")
    pid = _pid_of(job)
    os.kill(pid, sig)
    assert job.wait_output(f"got-{name}".encode(), timeout=15), job.peek()
    r = job.wait(60)
    lines = r.stdout.decode().splitlines()
    print(f"{name}: {lines}")
    assert f"got-{name}" in lines
    # The command handled the signal and exited 7: `cbatch run` returns that, as if the command ran directly.
    assert lines[-1] == "rc=7", lines
    assert r.exit_status == 0
    assert not job_containers(daemon.instance, job.job_id)


def test_sigkill_of_client_removes_container(mom, daemon, alice):
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG} sh -c 'echo ready; exec sleep 300' &
pid=$!
echo pid=$pid
wait $pid
echo rc=$?
exec sleep 300
""")
    pid = _pid_of(job)
    assert job_containers(daemon.instance, job.job_id)
    os.kill(pid, signal.SIGKILL)
    assert job.wait_output(b"rc=137\n", timeout=60), job.peek()
    # Removed while the job still runs (its script sleeps on): the daemon noticed the
    # client's end, not the job's. How fast is the bench's business (bench/), not an assertion here.
    deadline = time.monotonic() + 60
    while job_containers(daemon.instance, job.job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job_containers(daemon.instance, job.job_id)
    # The job still runs (sleep 300): the client's death removed the container, not the job's epilogue.
    assert not job.done
    job.qdel()
    job.wait(60)


def test_refused_outside_any_job(daemon, alice):
    res = subprocess.run(["runuser", "-u", alice.name, "--", "env", "PATH=/usr/bin:/bin",
                          f"CBATCH_SOCKET={daemon.socket}", "PBS_JOBID=1.forged", CBATCH, "run", "--image", IMG,
                          "true"], capture_output=True, text=True, timeout=30, cwd="/")
    assert res.returncode != 0
    assert res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("cbatch: "), res.stderr


def test_usage_error_is_one_line(mom, daemon, alice):
    job = _submit(mom, daemon, alice, f"""
$C run --image {IMG}
echo rc=$?
$C run --image {IMG} --bogus true 2>/dev/null
echo rc2=$?
""")
    r = job.wait(60)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "rc=125" and lines[1] != "rc2=0", lines
    err = r.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("cbatch: cbatch run: no command given"), err


@pytest.mark.engines_only("docker")     # the direct engine hands the container the client's descriptors
def test_piped_output_of_cbatch_run_survives_a_daemon_restart(daemon_factory, mom_factory, alice, workdir):
    """The Docker engine proxies a `cbatch run` whose stdout and stderr are pipes (its attach stream). cbatchd
    restarted while it runs: the client reattaches and the new daemon proxies both again, so what the command
    prints afterwards arrives and its status is its own. Before: the container was taken back unproxied and
    everything printed after the restart was lost."""
    d = daemon_factory("runpipe")
    job = _submit(mom_factory(d), d, alice, f"""
mkfifo out err
cat out & cat err >&2 &
$C run --image {IMG} sh -c 'echo one; while [ ! -e go ]; do sleep 0.1; done; echo two; echo err-two >&2; exit 3' \\
    >out 2>err
echo rc=$?
wait
""", workdir=workdir)
    assert job.wait_output(b"one\n", timeout=60), (job.peek(), d.log()[-2000:])
    d.restart()
    assert wait_until(lambda: reattached(d, job.job_id), 60) is not None, d.log()[-3000:]
    (workdir / "go").touch()
    r = job.wait(120)
    assert (r.exit_status, r.stdout.decode().splitlines(), r.stderr.decode().splitlines()) == \
        (0, ["one", "two", "rc=3"], ["err-two"]), (r, d.log()[-3000:])
    assert not job_containers(d.instance, job.job_id)
