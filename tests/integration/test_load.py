"""Issue 6, load: 200 container jobs at concurrency 16 through the pbs_mom emulator and the real engine.

Every exit status and every byte of output must be exact, and afterwards nothing of the run may be left:
no container of the instance, no ``/torque/<jobid>`` cgroup directory in any controller, no client
connection open in the daemon, no registered job.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cbatch.host import cgroups
from cbatch.clients import client
from torque_helpers import script, wait_until

JOBS = 200
CONCURRENCY = 16
STATUSES = (0, 1, 3, 42, 127, 255)
LINES = (0, 1, 1000, 40000)            # stdout sizes: nothing, one line, ~4 KiB, ~230 KiB


@pytest.fixture(scope="module")
def load_daemon(daemon_factory):
    return daemon_factory("load")


def _client_connections(daemon) -> int:
    """Unix sockets the daemon process holds that are bound to its socket path, minus the listener."""
    pid = daemon.proc.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    named = 0
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[6] in inodes and parts[7] == daemon.socket:
                named += 1
    return named - 1        # the listening socket itself


def _case(i: int):
    status, lines = STATUSES[i % len(STATUSES)], LINES[(i // 2) % len(LINES)]
    body = script(f"seq 1 {lines}; echo job-{i}; echo err-{i} >&2; exit {status}")
    expected = "".join(f"{k}\n" for k in range(1, lines + 1)) + f"job-{i}\n"
    return body, status, expected.encode(), f"err-{i}\n".encode(), i % 5 == 0


def test_200_jobs_at_concurrency_16_exact_and_leave_nothing(mom_factory, load_daemon, alice, bob):
    mom = mom_factory(load_daemon)
    users = (alice, bob)
    # The fixture's readiness ping has returned, but the daemon's side of it may still be closing.
    assert wait_until(lambda: _client_connections(load_daemon) == 0, timeout=5) is not None, \
        f"{_client_connections(load_daemon)} client connections open in a fresh cbatchd"

    def one(i):
        body, status, out, err, cg = _case(i)
        kw = {"cgroups": True, "resources": "nodes=1:ppn=1,walltime=00:10:00,mem=256mb"} if cg else {}
        job = mom.submit(body, users[i % 2].name, **kw)
        r = job.wait(300)
        return i, job.job_id, r, status, out, err

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(JOBS)))

    bad = []
    for i, job_id, r, status, out, err in results:
        if r.exit_status != status or r.stdout != out or r.stderr != err:
            bad.append((i, job_id, r.exit_status, status, hashlib.sha256(r.stdout).hexdigest()[:12],
                        hashlib.sha256(out).hexdigest()[:12], len(r.stdout), len(out), r.stderr[-300:]))
        if r.cgroup_leftovers:
            bad.append((i, job_id, "mom could not remove its cgroups", r.cgroup_leftovers))
    assert not bad, f"{len(bad)} of {JOBS} jobs wrong, first: {bad[:5]}\n{load_daemon.log()[-3000:]}"

    job_ids = [job_id for _i, job_id, *_ in results]
    assert len(set(job_ids)) == JOBS
    assert not load_daemon.containers()
    left = [p for job_id in job_ids for p in cgroups.existing(f"/torque/{job_id}")]
    assert not left, left[:10]
    # The last epilogue has returned, but a session thread may still be closing its connection.
    assert wait_until(lambda: _client_connections(load_daemon) == 0, timeout=5) is not None, \
        f"{_client_connections(load_daemon)} client connections still open in cbatchd"
    assert client.call(load_daemon.socket, "status")["jobs"] == []
    assert "internal error" not in load_daemon.log()
    assert load_daemon.proc.poll() is None
