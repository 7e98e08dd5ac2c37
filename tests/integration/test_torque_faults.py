"""End-to-end 9 and 10: every failure is one clear line in the job's .e file, 125 where cbatch failed, and
nothing is left behind; the prologue never fails a job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading

import pytest

from cbatch.admin import install
from torque_helpers import cbatch_lines, instance_containers, job_containers, run_epilogue, script, wait_until


def _one_cbatch_line(r, *words):
    lines = cbatch_lines(r.stderr)
    assert lines, (r.stdout, r.stderr)
    assert any(all(w in l for w in words) for l in lines), lines
    return lines


def test_engine_unreachable(daemon_factory, mom_factory, alice):
    d = daemon_factory("badengine", engine={"url": "unix:///run/cbatch-test/no-such-docker.sock", "timeout": 5})
    m = mom_factory(d)
    job = m.submit(script("echo never"), alice.name)
    r = job.wait(120)
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    _one_cbatch_line(r)
    assert r.epilogue_status == 0 and r.prologue_status == 0


def test_daemon_down(mom_factory, alice):
    path = f"/run/cbatch-test/nobody-{os.getpid()}.sock"
    m = mom_factory(path)
    job = m.submit(script("echo never"), alice.name)
    r = job.wait(60)
    assert r.prologue_status == 0 and r.epilogue_status == 0, "hooks must never fail the job"
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = r.stderr.decode().splitlines()
    # The prologue's log line comes first (pbs_mom appends its stderr before the job's), then the starter's.
    assert lines[0].startswith("cbatch prologue:") and job.job_id in lines[0], lines
    assert any(l.startswith("cbatch:") and "not reachable" in l for l in lines[1:]), lines


def test_image_missing(mom, daemon, alice):
    job = mom.submit(script("echo never", image="cbatch-test/does-not-exist:1"), alice.name)
    r = job.wait(120)
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = _one_cbatch_line(r, "cbatch-test/does-not-exist:1")
    assert len(lines) == 1
    assert not job_containers(daemon.instance, job.job_id)


def test_script_vanished_after_registration(mom_factory, daemon, alice):
    m = mom_factory(daemon)
    # Register, then lose the script (a full disk, an admin's clean-up). The prologue runs in-process (no
    # shell wrapper): its parent must stay the job's session leader, or the job would never be registered
    # and this would test "unregistered job" instead.
    wrapper = (f"#!{install.interpreter()} -I\n"
               "import os, sys\n"
               "from cbatch.clients import hooks\n"
               f"status = hooks.prologue_main(sys.argv[1:], socket_path={daemon.socket!r})\n"
               "os.unlink(sys.argv[8])\n"
               "sys.exit(status)\n")
    install.write_file(m.prologue, wrapper, 0o500)
    job = m.submit(script("echo never"), alice.name)
    r = job.wait(120)
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = cbatch_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cbatch: job script: cannot open: ") and "No such file" in lines[0], lines
    assert not job_containers(daemon.instance, job.job_id)


def test_daemon_restarted_mid_job(daemon_factory, mom_factory, alice):
    """design.md: cbatchd survives its own restart without losing running jobs."""
    d = daemon_factory("restart")
    m = mom_factory(d)
    job = m.submit(script("echo ready; sleep 5; echo done; exit 3"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    d.restart()
    r = job.wait(120)
    assert (r.exit_status, r.stdout, r.stderr) == (3, b"ready\ndone\n", b""), d.log()[-3000:]
    assert wait_until(lambda: not instance_containers(d.instance), timeout=10) is not None, \
        f"containers left: {instance_containers(d.instance)}"


def test_qdel_after_daemon_restart(daemon_factory, mom_factory, alice):
    """After a restart the daemon must still be able to stop a job it re-adopted."""
    d = daemon_factory("restart-qdel")
    m = mom_factory(d, run_epilogue=False)
    job = m.submit(script("echo ready; sleep 120"), alice.name, kill_delay=8.0)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    d.restart()
    job.qdel()
    r = job.wait(60)
    assert r.exit_status == 271, (r.stdout, r.stderr)
    assert not r.kill_delay_killed          # stopped by the restarted daemon, not by the mom's SIGKILL
    assert not job_containers(d.instance, job.job_id)
    assert run_epilogue(m, job, r.exit_status).returncode == 0


def test_startup_removes_unregistered_containers(daemon_factory, alice):
    d = daemon_factory("sweep")
    name = f"cbt-orphan-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--label", f"cbatch.instance={d.instance}",
                    "--label", "cbatch.job=999999.nowhere", "--label", "cbatch.kind=job",
                    "--label", f"cbatch.uid={alice.uid}", "--network", "none", "cbatch-test/busybox:1",
                    "sleep", "300"], check=True, capture_output=True)
    try:
        d.restart()
        took = wait_until(lambda: not instance_containers(d.instance), timeout=15)
        assert took is not None, f"orphan not removed: {instance_containers(d.instance)}\n{d.log()[-3000:]}"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_daemon_killed_starter_killed_nothing_leaks(daemon_factory, mom_factory, alice):
    d = daemon_factory("crash")
    m = mom_factory(d, run_epilogue=False)
    job = m.submit(script("echo ready; sleep 300"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    assert job_containers(d.instance, job.job_id)
    d.stop(sig=signal.SIGKILL)
    job.kill_starter(signal.SIGKILL)
    r = job.wait(30)
    assert r.exit_status == 265
    assert run_epilogue(m, job, r.exit_status).returncode == 0     # daemon down: logs, exits 0
    d.start()
    took = wait_until(lambda: not job_containers(d.instance, job.job_id), timeout=20)
    assert took is not None, f"container of a dead job survived the restart:\n{d.log()[-3000:]}"


JUNK = [
    [],
    ["only-one"],
    ["1.vm", "no-such-user-cbt", "grp", "n", "nodes=1", "batch", "", "/x/1.vm.SC"],
    ["1\n.vm", "cbt-alice", "grp", "n", "nodes=1", "batch", "", "/x/1.vm.SC"],
    ["1.vm", "cbt-alice", "grp", "n", "nodes=1", "batch", "", "relative/1.vm.SC"],
    ["x"] * 20,
]


@pytest.mark.parametrize("argv", JUNK, ids=[f"junk{i}" for i in range(len(JUNK))])
def test_prologue_with_junk_argv_exits_0_and_logs(mom, argv):
    env = {"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"}
    p = subprocess.run([mom.prologue, *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       cwd=mom.mom_priv, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode().startswith("cbatch prologue:"), p.stderr
    assert len(p.stderr.decode().splitlines()) == 1
    p = subprocess.run([mom.epilogue_path, *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       cwd=mom.mom_priv, timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("down", ["no-socket", "no-reply"])
def test_prologue_daemon_down_is_quick(mom_factory, down):
    """With no daemon the prologue tries once and lets the job go (exit 0, one line): it never waits or
    retries while pbs_mom waits for it. ``no-reply``: a socket that closes every connection unanswered, so
    the test counts the prologue's attempts: exactly one."""
    path = f"/run/cbatch-test/nobody-{os.getpid()}-{down}.sock"
    attempts, listener = [], None
    if down == "no-reply":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(16)

        def refuse_all() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                attempts.append(1)
                conn.close()
        server = threading.Thread(target=refuse_all, daemon=True)
        server.start()
    m = mom_factory(path)
    try:
        p = subprocess.run([m.prologue, "1.vm", "cbt-alice", "cbt-alice", "n", "nodes=1", "batch", "",
                            f"{m.jobs_dir}/1.vm.SC"], env={"PATH": "/bin:/usr/bin"}, capture_output=True,
                           timeout=60)
    finally:
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            server.join(10)
            os.unlink(path)
    assert p.returncode == 0
    assert len(p.stderr.decode().splitlines()) == 1, p.stderr
    if down == "no-socket":
        assert b"not reachable" in p.stderr
    else:
        assert len(attempts) == 1, (attempts, p.stderr)


@pytest.mark.parametrize("queue,head,words", [
    ("batch", "#CBATCH --image=docker.io/library/alpine:3", ["alpine:3"]),
    ("strict", "#CBATCH --image=native", ["native"]),
    ("batch", "#CBATCH --no-such-option", ["directive line 3"]),
], ids=["image-not-allowed", "native-refused", "bad-directive"])
def test_refusals_are_one_line_and_125(mom, daemon, alice, queue, head, words):
    body = f"#!/bin/bash\n#PBS -N t\n{head}\necho never\n".encode()
    job = mom.submit(body, alice.name, queue=queue)
    r = job.wait(120)
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbatch: "), lines
    assert all(w in lines[0] for w in words), lines
    assert not job_containers(daemon.instance, job.job_id)


def test_queue_missing_from_config_uses_defaults(mom, alice):
    """pbs_server only runs jobs from its own queues; one the cbatch config does not name gets the defaults."""
    r = mom.submit(script("test -e /.cbatch && echo contained"), alice.name, queue="unlisted").wait(120)
    assert (r.exit_status, r.stdout) == (0, b"contained\n"), r.stderr
