"""Mount targets are checked against the image's symlinks, and image VOLUMEs never become anonymous volumes.

The engine resolves a mount target's symlinks inside the image before it mounts: with ``/x -> /etc`` in the
image, ``#CBATCH --mount SRC:/x/passwd`` replaced the container's /etc/passwd, and ``/y -> /.cbatch`` let
``SRC:/y/exec`` replace the helper (the user's program became the entrypoint, started as the container's
user). Before the fix these jobs ran (checked with ``git stash``: /etc/passwd showed the user's file; the
anonymous volume for the image's VOLUME was created and /data was not a tmpfs).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from image_builder import hostile_image, remove
from torque_helpers import job_containers


@pytest.fixture(scope="module")
def link_image():
    ref = hostile_image(f"hostile-links:{os.getpid()}", links={"/x": "/etc", "/y": "/.cbatch", "/z": "x"})
    yield ref
    remove(ref)


@pytest.fixture(scope="module")
def home_link_image():
    ref = hostile_image(f"hostile-homelink:{os.getpid()}", links={"/home": "/tmp"})
    yield ref
    remove(ref)


@pytest.fixture(scope="module")
def volume_image():
    ref = hostile_image(f"hostile-volume:{os.getpid()}", changes=["VOLUME /data", "VOLUME /var/lib/thing"])
    yield ref
    remove(ref)


@pytest.fixture(scope="module")
def pdaemon(daemon_factory):
    return daemon_factory("paths", queues={
        "mounts": {"image": "cbatch-test/busybox:1",
                   "user_mounts": {"allowed": True, "prefixes": ["~", "/var/tmp"]}}})


@pytest.fixture(scope="module")
def pmom(mom_factory, pdaemon):
    return mom_factory(pdaemon)


def _job(image: str, body: str, *directives: str) -> bytes:
    lines = ["#!/bin/sh", f"#CBATCH --image={image}"] + [f"#CBATCH {d}" for d in directives]
    return ("\n".join(lines) + "\n" + body).encode()


def _source(workdir_for, carol):
    d = workdir_for(carol)
    src = d / "mine"
    src.write_text("evil:x:0:0::/:/bin/sh\n")
    os.chown(src, carol.uid, carol.gid)
    return src


def _assert_refused(pdaemon, job, r, *words):
    assert r.exit_status == 125, (r.exit_status, r.stdout, r.stderr)
    assert r.stdout == b""
    lines = r.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbatch: mount: target passes through a symlink"), lines
    assert all(w in lines[0] for w in words), (words, lines)
    assert not job_containers(pdaemon.instance, job.job_id)


@pytest.mark.parametrize("target,words", [
    ("/x/passwd", ["/x/passwd (/x -> /etc)"]),
    ("/y/exec", ["/y/exec (/y -> /.cbatch)"]),
    ("/z/group", ["/z/group (/z -> /etc)"]),        # a link to a link, resolved by the engine in the image
], ids=["onto-etc-passwd", "over-the-helper", "relative-link"])
def test_user_mount_through_image_symlink_refused(pmom, pdaemon, carol, workdir_for, link_image, target, words):
    src = _source(workdir_for, carol)
    job = pmom.submit(_job(link_image, "cat /etc/passwd /etc/group\n", f"--mount={src}:{target}"),
                      carol.name, queue="mounts")
    _assert_refused(pdaemon, job, job.wait(120), *words)


def test_plain_targets_in_the_same_image_still_work(pmom, pdaemon, carol, workdir_for, link_image):
    src = _source(workdir_for, carol)
    job = pmom.submit(_job(link_image, "cat /mnt/in\n", f"--mount={src}:/mnt/in"), carol.name, queue="mounts")
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == src.read_bytes()


def test_home_through_image_symlink_refused(pmom, pdaemon, carol, home_link_image):
    job = pmom.submit(_job(home_link_image, "echo ran\n"), carol.name, queue="mounts")
    _assert_refused(pdaemon, job, job.wait(120), f"{carol.home} (/home -> /tmp)")


def _volumes() -> set:
    return set(subprocess.run(["docker", "volume", "ls", "-q"], check=True, capture_output=True,
                              text=True).stdout.split())


def test_image_volumes_become_bounded_tmpfs(pmom, pdaemon, carol, volume_image):
    before = _volumes()
    job = pmom.submit(_job(volume_image, """grep -E ' /(data|var/lib/thing) ' /proc/mounts | cut -d' ' -f2,3
dd if=/dev/zero of=/data/big bs=1M count=100 2>/dev/null
echo dd=$?
"""), carol.name, queue="mounts")
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert sorted(lines[:2]) == ["/data tmpfs", "/var/lib/thing tmpfs"], lines
    assert lines[2] == "dd=1", lines                    # the 64 MiB bound: ENOSPC, not the node's disk
    assert _volumes() == before                         # no anonymous volume was ever created


def test_image_volume_inside_a_host_mount_refused(pmom, pdaemon, carol):
    """``VOLUME /home/cbt-carol/v``: the engine would create that directory, as root, in carol's real home.

    Before the fix the job ran and /home/cbt-carol/v appeared on the host, owned by root.
    """
    vol = os.path.join(carol.home, "cbt-vol-%d" % os.getpid())
    ref = hostile_image(f"hostile-homevol:{os.getpid()}", changes=[f"VOLUME {vol}"])
    try:
        job = pmom.submit(_job(ref, "echo ran\n"), carol.name, queue="mounts")
        r = job.wait(120)
        assert r.exit_status == 125 and r.stdout == b"", (r.exit_status, r.stdout, r.stderr)
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"cbatch: image: VOLUME inside a mounted host directory: {vol} ({carol.home} is mounted"), lines
        assert not os.path.lexists(vol)
    finally:
        if os.path.isdir(vol) and not os.path.islink(vol):
            os.rmdir(vol)
        remove(ref)
