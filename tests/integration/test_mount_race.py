"""Issue 9.3: a mount target inside the user's own (bind-mounted) home, raced with RENAME_EXCHANGE.

runc 1.1.5 (Debian 12's, on this machine) creates a missing mount target with MkdirAll on a path string after
resolving it once (CVE-2024-45310 shape). With the home bind-mounted first (Docker sorts mounts by target
depth), the target ``~/race/x/t`` of a ``--mount`` is created through ``~/race/x``, which the user can swap
with a symlink to any host directory between runc's check and its mkdir: root then creates ``t`` there.

The policy now refuses any mount inside another (cbatch.core.mountset), so runc never creates a target
through a path the user controls. Against the old code (the policy before the change, this test unchanged)
root created ``t`` in the root-only victim directory on try 39 of a first run and try 78 of a second (about
one second per job start); the test makes 150 tries, every one refused in one line.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torque_helpers import job_containers, script

pytestmark = [pytest.mark.root, pytest.mark.docker]

DEBIAN = "cbatch-test/debian:12"
TRIES = 150


@pytest.fixture(scope="module")
def rdaemon(daemon_factory):
    return daemon_factory("mountrace", queues={"mounts": {"image": DEBIAN, "user_mounts": {
        "allowed": True, "prefixes": ["~", "/var/tmp"]}}})


@pytest.fixture(scope="module")
def rmom(mom_factory, rdaemon):
    return mom_factory(rdaemon)


def _swapper(a: Path, b: Path, user) -> subprocess.Popen:
    """As ``user``: exchange ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE, syscall 316) in a loop,
    counting successful exchanges in ``a``'s parent's ``count`` file now and then (proof the race ran)."""
    code = ("import ctypes,os,sys\nlibc=ctypes.CDLL(None,use_errno=True)\n"
            "a,b=sys.argv[1].encode(),sys.argv[2].encode()\nn=0\n"
            "while True:\n"
            "    n+=libc.syscall(316,-100,a,-100,b,2)==0\n"
            "    if n%4096==1: open(sys.argv[3],'w').write(str(n))\n")
    return subprocess.Popen([sys.executable, "-I", "-c", code, str(a), str(b), str(a.parent / "count")],
                            user=user.uid, group=user.gid, extra_groups=[], start_new_session=True)


def test_mount_target_inside_home_cannot_be_raced_into_a_root_directory(rmom, rdaemon, alice, workdir_for):
    assert ctypes.sizeof(ctypes.c_long) == 8     # renameat2 is syscall 316 on x86_64 only
    victim = Path(f"/run/cbatch-test/victim-{os.getpid()}")
    victim.mkdir(mode=0o700)                     # root-only: alice cannot create anything here herself
    race = Path(alice.home) / f"race-{os.getpid()}"
    src = workdir_for(alice)
    race.mkdir()
    (race / "x").mkdir()
    os.symlink(str(victim), race / "y")
    for p in (race, race / "x"):
        os.chown(p, alice.uid, alice.gid)
    os.lchown(race / "y", alice.uid, alice.gid)
    proc = _swapper(race / "x", race / "y", alice)
    body = script("echo ran").replace(b"#PBS -N test\n", f"#CBATCH --mount={src}:{race}/x/t\n".encode())
    created, statuses, lines = [], [], set()
    try:
        for _ in range(TRIES):
            job = rmom.submit(body, alice.name, queue="mounts")
            r = job.wait(120)
            statuses.append(r.exit_status)
            lines.update(l for l in r.stderr.decode(errors="replace").splitlines() if l.startswith("cbatch:"))
            assert not job_containers(rdaemon.instance, job.job_id)
            created = os.listdir(victim)
            if created:
                break
        swaps = int((race / "count").read_text() or 0)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        leftovers = os.listdir(victim)
        shutil.rmtree(victim, ignore_errors=True)
        shutil.rmtree(race, ignore_errors=True)
    assert swaps > 0                             # the race ran while the jobs started
    assert not created and not leftovers, f"root created {created or leftovers} in {victim}: {statuses}"
    assert statuses == [125] * TRIES
    assert lines == {f"cbatch: directive line 2: mount target inside another mount: {race}/x/t inside "
                     f"{alice.home} (home directory) (cbatch never mounts one path inside another: the engine "
                     f"would create it through directories the user can change; choose a target outside "
                     f"{alice.home})"}
