"""A PBS container job's own TM tasks (``pbsdsh``, ``pbs_tmrsh``) on the real OpenPBS: the client comes from the
running pbs_mom's PBS_EXEC (mounted read-only), reaches the mom through the job's TM relay, and every task
the mom then spawns goes through the launch hook into the job's container (docs/pbs.md).

The image is cbatch-test/debian:12 plus the host's libcrypto.so.3 (PBS's client needs it; Debian minbase has
not got it) and a marker file no host has: a task that prints the marker ran in the image.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid

import pytest

from trq import instance_containers, wait_until

IMAGE = "cbatch-test/pbs-tm:1"
RECIPE = "pbs-tm-1"
MARKER = "/etc/cbatch-pbs-tm-marker"
MARK = "only-in-the-pbs-tm-image"
PBSDSH, TMRSH = "/opt/pbs/bin/pbsdsh", "/opt/pbs/bin/pbs_tmrsh"


@pytest.fixture(scope="session")
def tm_image(test_images):
    """The test image with PBS's client libraries (built once from cbatch-test/debian:12, cached by recipe)."""
    got = subprocess.run(["docker", "image", "inspect", "--format", '{{index .Config.Labels "cbatch.test.recipe"}}',
                          IMAGE], capture_output=True, text=True)
    if got.returncode == 0 and got.stdout.strip() == RECIPE:
        return IMAGE
    lib = os.path.realpath("/lib/x86_64-linux-gnu/libcrypto.so.3")
    with tempfile.TemporaryDirectory() as ctx:
        with open(lib, "rb") as src, open(os.path.join(ctx, "libcrypto.so.3"), "wb") as dst:
            dst.write(src.read())
        with open(os.path.join(ctx, "marker"), "w") as fh:
            fh.write(MARK + "\n")
        with open(os.path.join(ctx, "Dockerfile"), "w") as fh:
            fh.write(f"FROM {test_images['debian']}\nCOPY libcrypto.so.3 /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n"
                     f"COPY marker {MARKER}\nLABEL cbatch.test.recipe={RECIPE}\n")
        r = subprocess.run(["docker", "build", "-q", "-t", IMAGE, ctx], capture_output=True, text=True,
                           env=dict(os.environ, DOCKER_BUILDKIT="0"))
        assert r.returncode == 0, r.stderr
    return IMAGE


def _job(pbs, alice, wd, body: str, name: str = "tm.sh") -> str:
    return pbs.qsub(alice, f"#!/bin/bash\n#CBATCH --image={IMAGE}\n{body}", ["-q", "short"], wd, name=name)


def test_pbsdsh_tasks_run_in_the_jobs_container(pbs, cbatchd, alice, wd, tm_image):
    job = _job(pbs, alice, wd, f"test -e /.cbatch && cat {MARKER}\n"
               f"{PBSDSH} -- /bin/sh -c 'test -e /.cbatch && cat {MARKER} && echo task $PBS_TASKNUM $(id -u)'\n"
               "echo rc=$?\n")
    r = pbs.wait(job)
    assert r.exit_status == 0, (r.attrs, r.stdout, r.stderr)
    assert r.stdout.decode().splitlines() == [MARK, MARK, f"task 00000002 {alice.uid}", "rc=0"], (r.stdout, r.stderr)
    assert b"cbatch:" not in r.stderr, r.stderr
    log = cbatchd.log()
    assert f"job {job}: TM task pid" in log and "joined container" in log, log[-3000:]
    assert not instance_containers(cbatchd.instance, job)


def test_pbs_tmrsh_returns_the_tasks_status(pbs, cbatchd, alice, wd, tm_image):
    job = _job(pbs, alice, wd, f"{TMRSH} $(head -1 $PBS_NODEFILE) /bin/sh -c 'cat {MARKER}; exit 4'\n"
               "echo rc=$?\n")
    r = pbs.wait(job)
    assert r.exit_status == 0, (r.attrs, r.stdout, r.stderr)
    assert r.stdout.decode().splitlines() == [MARK, "rc=4"], (r.stdout, r.stderr)


def test_a_wrong_request_spawns_nothing(pbs, cbatchd, alice, wd, tm_image):
    """Through the relay: another job's id never reaches the mom (the relay closes the connection), an RM
    request neither, and a wrong cookie is refused by pbs_mom itself; no task is ever spawned."""
    spawned = os.path.join(alice.home, f"tm-spawned-{uuid.uuid4().hex[:12]}")
    task = f"/bin/sh -c 'touch {spawned}; echo spawned'"
    rm = r"printf 'PKTV1\0\0\0\0\0\x0d+1+1+6status' >&3"
    job = _job(pbs, alice, wd,
               f"PBS_JOBID=1{'${PBS_JOBID}'} {PBSDSH} -- {task}; echo other-job=$?\n"
               f"PBS_JOBCOOKIE=00000000000000000000000000000000 {PBSDSH} -- {task}; echo wrong-cookie=$?\n"
               f"exec 3<>/dev/tcp/127.0.0.1/$PBS_MOMPORT && {rm} && cat <&3; echo rm-closed=$?\n")
    try:
        r = pbs.wait(job)
        out = r.stdout.decode()
        assert "spawned" not in out and not os.path.exists(spawned), (r.stdout, r.stderr)
        assert "other-job=1" in out and "wrong-cookie=" in out and "rm-closed=0" in out, (r.stdout, r.stderr)
        assert b"tm_init failed" in r.stderr, r.stderr
        assert "TM relay: connection closed: not a TM request" in cbatchd.log(), cbatchd.log()[-3000:]
    finally:
        if os.path.exists(spawned):
            os.unlink(spawned)


def test_pbsdsh_after_a_cbatchd_restart(pbs, cbatchd, alice, wd, tm_image):
    """The relay lives in cbatchd: after a restart the reattached session re-creates it with OpenPBS's gate
    (the batch system is in the session's record), and the job's next pbsdsh works. The job waits for a
    file the test creates once the starter has reattached."""
    tag = uuid.uuid4().hex[:12]
    up, go = os.path.join(alice.home, f"pbs-tm-up-{tag}"), os.path.join(alice.home, f"pbs-tm-go-{tag}")
    job = _job(pbs, alice, wd, f"touch {up}\nwhile [ ! -e {go} ]; do sleep 0.2; done\n"
               f"{PBSDSH} -- /bin/sh -c 'cat {MARKER}'\necho rc=$?\n")
    try:
        assert wait_until(lambda: os.path.exists(up), 120), "the job never started"
        before = cbatchd.log_size()
        cbatchd.restart()
        j = re.escape(job)
        assert wait_until(lambda: re.search(rf"job {j}: container [\w-]+: pid \d+ reattached.*job {j}: container "
                                            rf"[\w-]+: TM relay on .*OpenPBS TM packets", cbatchd.log_since(before),
                                            re.S), 60), cbatchd.log()
        open(go, "w").close()
        r = pbs.wait(job)
        assert r.exit_status == 0 and r.stdout.decode().splitlines() == [MARK, "rc=0"], (r.stdout, r.stderr)
    finally:
        for path in (up, go):
            if os.path.exists(path):
                os.unlink(path)
