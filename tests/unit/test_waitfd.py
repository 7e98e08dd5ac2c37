"""Waiting on one descriptor past FD_SETSIZE (cbatch.host.waitfd): cbatchd holds every client's connection,
pidfds and spool files, and under this project's CI limit (20,000) its descriptors pass 1,023. select() then
raised ValueError ("filedescriptor out of range") where the daemon waited for a path child's answer or for a
direct container's shim: the job's start or its end failed. These tests fill the descriptor table first."""

import contextlib
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cbatch.core.job import Identity
from cbatch.engines import bundles
from cbatch.host import forkserver, paths, waitfd

HIGH = 1100


@contextlib.contextmanager
def crowded():
    """Descriptors open until the next one is numbered past ``HIGH``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HIGH + 64:
        pytest.skip(f"descriptor limit {hard} is below {HIGH + 64}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 64) if soft != resource.RLIM_INFINITY else soft,
                                                hard))
    held = []
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        held.append(null)
        while held[-1] < HIGH:
            held.append(os.dup(null))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_readable_past_fd_setsize():
    with crowded():
        r, w = os.pipe()
        try:
            assert r > 1023
            assert waitfd.readable(r, 0.05) is False            # nothing yet: the timeout
            os.write(w, b"x")
            assert waitfd.readable(r, 5) is True
            os.read(r, 1)
            os.close(w)
            w = -1
            assert waitfd.readable(r) is True                   # end of file, no timeout
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


def test_a_pidfd_is_readable_once_its_process_exited():
    with crowded():
        child = subprocess.Popen(["sleep", "0.2"])
        fd = os.pidfd_open(child.pid)
        try:
            assert fd > 1023 and waitfd.readable(fd, 0) is False
            assert waitfd.readable(fd, 30) is True
        finally:
            os.close(fd)
            child.wait()


root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (children drop to another user)")


@root
@pytest.mark.parametrize("via", ["fork server", "fork"])
def test_paths_resolved_as_the_user_past_fd_setsize(via):
    base = Path(tempfile.mkdtemp(prefix="cbatch-waitfd-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        if via == "fork server":
            paths.start_forkserver()
        with crowded():
            assert paths.resolve_as_user(str(base), Identity.lookup("nobody")) == str(base)
    finally:
        forkserver.stop()
        shutil.rmtree(base)


@root
def test_direct_wait_on_a_shim_past_fd_setsize(tmp_path):
    from cbatch.engines.direct import DirectEngine
    engine = DirectEngine(docker=None, bundles=str(tmp_path), instance="waitfd")
    shim = subprocess.Popen(["sleep", "0.3"])
    bundle = tmp_path / "waitfd" / "c1"
    bundle.mkdir(parents=True)
    bundles.write_json(str(bundle / "meta.json"), {"cid": "direct-c1", "name": "c1", "labels": {},
                                                   "shim": shim.pid, "shim_start": bundles.start_time(shim.pid)})
    try:
        with crowded():
            fd = engine._shim_fd(engine._meta("direct-c1"))
            assert fd is not None and fd > 1023
            os.close(fd)
            (bundle / "status").write_text("status 7 oom 0 cpu_us -1 peak_bytes -1 deleted shim\n")
            assert engine.wait("direct-c1").status == 7
            assert shim.poll() is not None                       # it waited for the shim to end
    finally:
        shim.kill()
        shim.wait()
