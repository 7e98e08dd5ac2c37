"""Issue #9.5 and #9.6: one user cannot starve the others of connections or of the daemon.

- A user in no job who holds more connections than the daemon's whole old cap (1,100 > 1,024) must not keep
  another user's prologue, starter and epilogue from getting through: per-uid caps, and root and users with
  a registered job outside the shared pool. Against the old code the victim jobs ended 125 ("busy: 1024
  connections") on the first try.
- One job cannot start more ``cbatch run`` containers at once than its limit (default max(1, its cpus)):
  the next one is refused with one line naming the limit and its key. The old code started them all.
- The cap holds across a cbatchd restart: the ``cbatch run`` containers the restarted daemon adopts count
  from start-up, so the job's next run is still refused. Before the fix the restarted daemon counted only
  the runs started since and let the job double its containers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torque_helpers import cbatch_lines, reattached, script, wait_until

CBATCH = str(Path(sys.executable).parent / "cbatch")
IMG = "cbatch-test/busybox:1"
FLOOD = 1100

# Root raises its descriptor limit, drops to the user, then keeps FLOOD connections open: every one the
# daemon closes (refused, or idle) is opened again, until stdin closes.
FLOODER = textwrap.dedent("""
    import os, pwd, resource, select, socket, sys, threading, time
    path, user, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
    pw = pwd.getpwnam(user)
    os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    socks, sweeps = [None] * n, 0
    while not stop.is_set():
        p = select.poll()
        for s in socks:
            if s is not None:
                p.register(s, select.POLLIN | select.POLLHUP)
        closed = {fd for fd, _ev in p.poll(0)}
        for i in range(n):
            s = socks[i]
            if s is not None:
                if s.fileno() not in closed:
                    continue
                s.close()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                s.close(); s = None
            socks[i] = s
        sweeps += 1
        if sweeps == 1:
            print("flooding", flush=True)
        if sweeps % 20 == 0:
            print("held", sum(s is not None for s in socks), flush=True)
        time.sleep(0.05)
""")


@pytest.fixture(scope="module")
def ldaemon(daemon_factory):
    return daemon_factory("limits")


def test_connection_flood_by_a_user_in_no_job(mom_factory, ldaemon, alice, bob):
    mom = mom_factory(ldaemon)
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, ldaemon.socket, bob.name, str(FLOOD)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline().strip() == "flooding"
        # The moment under test: the daemon is refusing bob's connections.
        assert wait_until(lambda: "refus" in ldaemon.log() and "connections" in ldaemon.log(), 30) is not None, \
            ldaemon.log()[-2000:]
        jobs = [mom.submit(script(f"echo job-{i}; exit {i}"), alice.name, queue="debian") for i in range(3)]
        for i, job in enumerate(jobs):
            r = job.wait(180)
            assert (r.exit_status, r.stdout, r.stderr) == (i, f"job-{i}\n".encode(), b""), (r, ldaemon.log()[-3000:])
            assert r.prologue_status == 0 and r.epilogue_status == 0
    finally:
        flooder.stdin.close()
        flooder.wait(30)
    log = ldaemon.log()
    for job in jobs:
        assert f"job {job.job_id}: registered" in log and f"job {job.job_id}: unregistered" in log


def _nofile(pid: int) -> tuple:
    with open(f"/proc/{pid}/limits") as fh:
        (line,) = [ln for ln in fh if ln.startswith("Max open files")]
    return tuple(int(x) for x in line.split()[3:5])


def test_a_connection_flood_past_systemds_soft_descriptor_limit(daemon_factory, mom_factory, alice, bob):
    """cbatchd started as systemd starts it (soft descriptor limit 1,024, hard far above), on a site that lets
    a user hold more connections than that: bob holds 1,100 while alice's jobs start. Before: the daemon kept
    the soft limit, its accept() failed with EMFILE ("accept failed: Too many open files") and every other
    client waited behind the flood. Now it raises the soft limit to the hard one at start-up."""
    d = daemon_factory("fdlimit", nofile=(1024, 20000),
                       daemon={"max_connections": FLOOD + 500, "max_connections_per_user": FLOOD + 500})
    assert _nofile(d.proc.pid) == (20000, 20000), d.log()[-2000:]
    mom = mom_factory(d)
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, d.socket, bob.name, str(FLOOD)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline().strip() == "flooding"
        # The moment: the daemon holds more descriptors than the soft limit it was started with.
        assert wait_until(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) > 1100, 60) is not None, \
            (len(os.listdir(f"/proc/{d.proc.pid}/fd")), d.log()[-2000:])
        jobs = [mom.submit(script(f"echo job-{i}; exit {i}"), alice.name, queue="debian") for i in range(2)]
        for i, job in enumerate(jobs):
            r = job.wait(180)
            assert (r.exit_status, r.stdout, r.stderr) == (i, f"job-{i}\n".encode(), b""), (r, d.log()[-3000:])
    finally:
        flooder.stdin.close()
        flooder.wait(30)
    assert "accept failed" not in d.log()
    assert "descriptor limit: 20000" in d.log()


def test_run_containers_per_job_are_capped(mom, daemon, alice, workdir):
    # ppn=2: at most 2 `cbatch run` containers at once (daemon.max_run_containers 0 = the job's cpus).
    body = f"""
C={CBATCH}
cd {workdir}
rm -f up-1 up-2
$C run --image {IMG} sh -c 'touch up-1; sleep 4' &
$C run --image {IMG} sh -c 'touch up-2; sleep 4' &
until [ -e up-1 ] && [ -e up-2 ]; do sleep 0.1; done
echo both-up
$C run --image {IMG} echo third
echo rc=$?
wait
$C run --image {IMG} echo after
"""
    job = mom.submit(script(body, image=None), alice.name, resources="nodes=1:ppn=2,walltime=00:10:00",
                     variables={"CBATCH_SOCKET": daemon.socket}, workdir=str(workdir), initdir=str(workdir))
    r = job.wait(120)
    out = r.stdout.decode().splitlines()
    assert out[0] == "both-up" and out[1] != "third", out
    assert out[1].startswith("rc=") and out[1] != "rc=0", out
    assert out[-1] == "after", out
    lines = cbatch_lines(r.stderr)
    assert lines == [f"cbatch: run: too many containers for job {job.job_id}: 2 running "
                     "(limit 2, key daemon.max_run_containers)"], r.stderr


def test_run_cap_holds_across_a_daemon_restart(daemon_factory, mom_factory, alice, workdir):
    """The cap counts the cbatch run containers a restarted cbatchd adopted: with 2 of a ppn=2 job's runs
    reattached after the restart, the third is refused (the old code counted only runs started since the
    restart, and started it)."""
    d = daemon_factory("runcap")
    m = mom_factory(d)
    body = f"""
C={CBATCH}
cd {workdir}
$C run --image {IMG} sh -c 'touch up-1; until [ -e release ]; do sleep 0.1; done' &
$C run --image {IMG} sh -c 'touch up-2; until [ -e release ]; do sleep 0.1; done' &
until [ -e up-1 ] && [ -e up-2 ]; do sleep 0.1; done
echo both-up
until [ -e restarted ]; do sleep 0.1; done
$C run --image {IMG} echo third
echo rc=$?
touch release
wait
$C run --image {IMG} echo after
"""
    job = m.submit(script(body, image=None), alice.name, resources="nodes=1:ppn=2,walltime=00:10:00",
                   variables={"CBATCH_SOCKET": d.socket}, workdir=str(workdir), initdir=str(workdir))
    assert job.wait_output(b"both-up\n", timeout=120), (job.peek(), d.log()[-3000:])
    d.restart()
    # The moment: both runs' clients have taken their containers back from the restarted daemon.
    assert wait_until(lambda: reattached(d, job.job_id) == 2, timeout=60) is not None, d.log()[-3000:]
    (workdir / "restarted").touch()
    r = job.wait(120)
    out = r.stdout.decode().splitlines()
    assert out[0] == "both-up" and out[1].startswith("rc=") and out[1] != "rc=0", (out, r.stderr)
    assert out[-1] == "after", out
    assert cbatch_lines(r.stderr) == [f"cbatch: run: too many containers for job {job.job_id}: 2 running "
                                      "(limit 2, key daemon.max_run_containers)"], r.stderr
