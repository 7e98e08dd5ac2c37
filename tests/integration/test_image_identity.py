"""The job's identity comes from the host only, whatever the image's /etc/passwd and /etc/group say
(issue #9); the login shell may be missing from the image (issue #10); privileged ports stay privileged.

Before the fix the engine passed the supplementary groups as ``group_add`` and runc matched each entry as a
group NAME in the image's /etc/group first: an image line ``1001:x:0:`` gave the job gid 0, and so a
setgid-root file in the bind-mounted home. These tests fail on that code (checked with ``git stash``: the
job's groups came back as ``0 107 ...`` and the created file was group root).
"""

from __future__ import annotations

import grp
import os

import pytest

from image_builder import hostile_image, remove
from torque_helpers import cbatch_lines, job_containers, script

BUSYBOX = "cbatch-test/busybox:1"
NOSHELL = "cbatch-test/noshell:1"


def _docker_gid() -> int:
    try:
        return grp.getgrnam("docker").gr_gid
    except KeyError:
        return 107


@pytest.fixture(scope="module")
def ids_image(users):
    """Every trick an image can play on name resolution, aimed at cbt-carol."""
    carol = users["cbt-carol"]
    dgid = _docker_gid()
    group = ["root:x:0:cbt-carol", f"docker:x:{dgid}:cbt-carol,{carol.name}"]
    for n, g in enumerate(carol.groups):          # a group NAMED like each of carol's gids
        group.append(f"{g}:x:{0 if n % 2 == 0 else dgid}:")
    group += [f"{dgid}:x:0:", f"0:x:{dgid}:", "cbt-carol:x:0:cbt-carol",
              f"dupe:x:{carol.gid}:cbt-carol", "dupe2:x:0:cbt-carol", f"{carol.gid}:x:0:cbt-carol"]
    passwd = ["root:x:0:0:root:/root:/bin/sh", f"{carol.uid}:x:0:0::/root:/bin/sh",
              f"{carol.name}:x:0:0::/root:/bin/sh", f"evil:x:{carol.uid}:0::/root:/bin/sh"]
    ref = hostile_image(f"hostile-ids:{os.getpid()}",
                        files={"/etc/group": "\n".join(group) + "\n", "/etc/passwd": "\n".join(passwd) + "\n"})
    yield ref
    remove(ref)


@pytest.fixture(scope="module")
def idaemon(daemon_factory):
    return daemon_factory("ids", queues={
        "bridge": {"image": BUSYBOX, "network": "bridge", "networks": ["none", "bridge"]}})


@pytest.fixture(scope="module")
def imom(mom_factory, idaemon):
    return mom_factory(idaemon)


def _status(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            out[key] = value.split()
    return out


def test_image_names_never_resolve_the_jobs_ids(imom, idaemon, carol, ids_image, workdir_for):
    wd = workdir_for(carol)
    job = imom.submit(script("""
grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+):' /proc/self/status
echo umask=$(umask)
touch made
mkdir made.d
""", image=ids_image, shebang="#!/bin/sh"), carol.name, initdir=str(wd), workdir=str(wd))
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    st = _status(r.stdout.decode())
    assert st["Uid"] == [str(carol.uid)] * 4, st
    assert st["Gid"] == [str(carol.gid)] * 4, st
    assert sorted(int(g) for g in st["Groups"]) == sorted(carol.groups), st
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap][0], 16) == 0, (cap, st)
    umask = int(r.stdout.decode().split("umask=")[1].split()[0], 8)
    for name in ("made", "made.d"):
        s = os.lstat(wd / name)
        assert (s.st_uid, s.st_gid) == (carol.uid, carol.gid), (name, s.st_uid, s.st_gid)
        assert s.st_mode & 0o7777 == (0o666 if name == "made" else 0o777) & ~umask, (name, oct(s.st_mode))
    assert not job_containers(idaemon.instance, job.job_id)


def test_login_shell_missing_runs_the_line_with_bin_sh(imom, idaemon, alice, workdir):
    """cbt-alice's login shell is /bin/bash; the busybox image has none. Before: 127, nothing ran."""
    body = 'echo "zero=$0 args=$*"\necho to-stderr >&2\nexit 7\n'
    results = {}
    for image in ("cbatch-test/debian:12", BUSYBOX):
        job = imom.submit(script(body, image=image, shebang="#!/bin/sh"), alice.name, args=("a", "b c"),
                          initdir=str(workdir), workdir=str(workdir))
        results[image] = job.wait(120), job.job_id.encode()
    (ref, ref_id), (got, got_id) = results["cbatch-test/debian:12"], results[BUSYBOX]
    assert got.exit_status == 7, got.stderr
    assert got_id + b".SC args=a b c\n" in got.stdout, got.stdout
    assert got.stdout.replace(got_id, b"ID") == ref.stdout.replace(ref_id, b"ID"), (got.stdout, ref.stdout)
    assert got.stderr == ref.stderr == b"to-stderr\n"


def test_no_shell_and_no_interpreter_is_127_with_one_line(imom, idaemon, alice, workdir):
    job = imom.submit(script("echo hi\n", image=NOSHELL, shebang="#!/bin/sh"), alice.name,
                      initdir=str(workdir), workdir=str(workdir))
    r = job.wait(120)
    assert r.exit_status == 127, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbatch: command: no shell in the image"), lines


def test_check_names_the_shell_fallback(engine, alice):
    """The one line ``cbatch check`` prints for an image without the user's login shell."""
    from cbatch.engines.docker import shell_note
    assert shell_note(engine, "cbatch-test/debian:12", "/bin/bash") is None
    line = shell_note(engine, BUSYBOX, "/bin/bash")
    assert line and line.startswith("cbatch: image: login shell not in the image: /bin/bash"), line
    assert "/bin/sh" in line
    bad = shell_note(engine, NOSHELL, "/bin/bash")
    assert bad and "no /bin/sh either" in bad, bad


def test_bridge_keeps_privileged_ports_privileged(imom, idaemon, carol, workdir_for):
    """Docker sets ip_unprivileged_port_start=0 in the container's namespace; the job must keep the host's.

    Loopback only. Before the fix the job read 0 and httpd listened on 127.0.0.1:80 until timeout killed it.
    """
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as fh:
        host = max(1024, int(fh.read()))
    wd = workdir_for(carol)
    job = imom.submit(script("""
echo start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)
timeout 2 httpd -f -p 127.0.0.1:80
echo low=$?
timeout 2 httpd -f -p 127.0.0.1:8080
echo high=$?
""", image=BUSYBOX, shebang="#!/bin/sh"), carol.name, queue="bridge", initdir=str(wd), workdir=str(wd))
    r = job.wait(120)
    out = dict(l.split("=", 1) for l in r.stdout.decode().splitlines() if "=" in l)
    assert out["start"] == str(host), out
    assert out["low"] == "1" and b"Permission denied" in r.stderr, (out, r.stderr)
    assert out["high"] != "1", (out, r.stderr)       # the same httpd did listen on a high port (timed out)
    assert not cbatch_lines(r.stderr), r.stderr
