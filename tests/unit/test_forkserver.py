"""The fork server (cbatch.host.forkserver) behind paths' children acting as a user: the same answers as a
fork of the daemon, no fork of the daemon, nothing of the daemon's in its children, and every way it can fail
ends in an error or a fallback, never a hang. Needs root (the children drop to ``nobody``)."""

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cbatch.core.errors import PolicyError
from cbatch.core.job import Identity
from cbatch.host import forkserver, paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (children drop to another user)")


def _nobody() -> Identity:
    return Identity.lookup("nobody")


@pytest.fixture
def server():
    pid = paths.start_forkserver()
    yield pid
    forkserver.stop()


@pytest.fixture
def tree():
    base = Path(tempfile.mkdtemp(prefix="cbatch-fork-", dir="/tmp"))     # pytest's tmp is root-only
    os.chmod(base, 0o755)
    (base / "scratch" / "data").mkdir(parents=True)
    (base / "secret").mkdir(mode=0o700)                                  # root-only directory
    (base / "secret" / "file").write_text("x")
    (base / "scratch" / "to-secret").symlink_to(base / "secret" / "file")
    yield base
    shutil.rmtree(base)


def _no_fork(*_a, **_k):
    raise AssertionError("the daemon forked: the fork server should have made the child")


# A server whose children do what a test needs instead of paths' work (the same serve_forever loop).
FAKE = """
import os, socket, sys, time
from cbatch.host import forkserver

def report(_fields, sock):
    socket.socket.send(sock, " ".join(sorted(os.listdir("/proc/self/fd"))).encode())
    os._exit(0)

def hang(_fields, _sock):
    time.sleep(60)
    os._exit(0)

forkserver.serve_forever(int(sys.argv[2]), {"report": report, "hang": hang}[sys.argv[1]])
"""


def _fake(kind: str) -> int:
    return forkserver.start([sys.executable, "-c", FAKE, kind])


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def test_the_server_answers_as_the_user_and_the_daemon_never_forks(server, tree, monkeypatch):
    monkeypatch.setattr(paths.os, "fork", _no_fork)
    nobody = _nobody()
    assert paths.resolve_as_user(str(tree / "scratch" / "data"), nobody) == str(tree / "scratch" / "data")
    # root could see through the symlink; the server's child, as nobody, must not
    with pytest.raises(PolicyError) as exc:
        paths.resolve_as_user(str(tree / "scratch" / "to-secret"), nobody)
    assert exc.value.message == (f"cbatch: path: permission denied: {tree}/scratch/to-secret "
                                 "(the job's user cannot access it)")
    resolver = paths.batch_resolver([str(tree / "scratch" / "data"), str(tree / "secret" / "file")], nobody,
                                    pin=True)
    try:
        assert resolver(str(tree / "scratch" / "data"), nobody) == str(tree / "scratch" / "data")
        assert list(resolver.opened) == [str(tree / "scratch" / "data")]     # the secret one was not opened
        fd = resolver.opened[str(tree / "scratch" / "data")]
        assert os.path.samestat(os.fstat(fd), os.stat(tree / "scratch" / "data"))
    finally:
        resolver.close()
    fds = paths.open_all_as_user([str(tree / "scratch" / "data")], nobody)
    assert len(fds) == 1
    os.close(fds[0])
    assert os.geteuid() == 0 and forkserver.pid() == server


def test_a_swapped_in_symlink_is_refused_through_the_server(server, tree, monkeypatch):
    monkeypatch.setattr(paths.os, "fork", _no_fork)
    checked = str(tree / "scratch" / "data")
    os.rmdir(checked)
    os.symlink(tree / "secret", checked)          # the path the user had checked is a symlink now
    with pytest.raises(PolicyError) as exc:
        paths.open_all_as_user([checked], _nobody())
    assert exc.value.message == (f"cbatch: mount: changed while being checked: {checked} "
                                 "(a symlink appeared; refusing)")


def test_the_servers_children_hold_nothing_of_the_daemons(tree):
    """The daemon's other fds (jobs' spool files, its socket) must not reach a process that becomes the user:
    the server inherits only its control socket, the child closes that and its own pidfd."""
    secret = os.open(tree / "secret" / "file", os.O_RDONLY)         # inheritable, as a careless fd would be
    os.set_inheritable(secret, True)
    try:
        pid = _fake("report")
        sock = forkserver.spawn([b"x"])
        first = socket.recv_fds(sock, 64, 1)
        assert first[0] == b"P" and len(first[1]) == 1
        pidfd = first[1][0]
        listing = sock.recv(4096).decode().split()
        os.close(pidfd)
        sock.close()
        # stdin/stdout on /dev/null, stderr, the request socket; listdir's own fd is the one extra
        assert len(listing) == 5 and str(secret) not in listing[3:], listing
        server_fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        assert secret not in server_fds and len(server_fds) == 4, server_fds
        with open(f"/proc/{pid}/comm") as fh:
            assert fh.read().strip() == "cbatchd-fork"
    finally:
        os.close(secret)
        forkserver.stop()


def test_a_hung_child_is_killed_at_the_timeout_by_its_pidfd(monkeypatch):
    pid = _fake("hang")
    try:
        monkeypatch.setattr(paths, "TIMEOUT", 1.0)
        sock = forkserver.spawn([b"x"])
        deadline = time.monotonic() + 10
        while not _children(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        (child,) = _children(pid)                  # the moment: the child exists and is hanging
        with pytest.raises(PolicyError) as exc:
            paths._collect(sock, 0, "/some/path")
        assert exc.value.message == "cbatch: path: timed out resolving: /some/path (a hung filesystem?)"
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{child}")   # killed (and reaped by the server)
    finally:
        forkserver.stop()


def test_a_request_the_server_cannot_parse_is_an_error_not_a_hang(server):
    sock = forkserver.spawn([b"bogus"])
    with pytest.raises(PolicyError) as exc:
        paths._collect(sock, 0, "/x")
    assert exc.value.message == "cbatch: path: cannot resolve (Input/output error): /x"


def test_a_dead_server_means_the_daemon_forks_again(server, tree):
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{server}/stat") as fh:
            if fh.read().split(") ")[1][0] == "Z":
                break
        time.sleep(0.01)
    nobody = _nobody()
    assert paths.resolve_as_user(str(tree / "scratch" / "data"), nobody) == str(tree / "scratch" / "data")
    assert forkserver.pid() == 0 and not os.path.exists(f"/proc/{server}")   # forgotten and reaped


def test_the_server_exits_when_the_daemons_end_closes():
    pid = paths.start_forkserver()
    proc, ctl = forkserver._proc, forkserver._ctl
    forkserver._ctl = forkserver._proc = None
    ctl.close()                     # what the daemon's exit does
    assert proc.wait(10) == 0 and proc.pid == pid
