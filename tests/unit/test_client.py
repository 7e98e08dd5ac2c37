"""cbatch.clients.client against a fake daemon on a unix socket: replies, errors, the session loop, reattach."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time

import pytest

from cbatch import protocol
from cbatch.clients import client
from cbatch.core.errors import DaemonError, PolicyError


class FakeDaemon:
    """Serves scripted conversations: ``script(conn, msg, fds)`` runs for each accepted connection."""

    def __init__(self, path: str, *scripts):
        self.path = path
        self.scripts = list(scripts)
        self.seen = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.scripts:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            msg, fds = protocol.recv(conn, timeout=5)
            self.seen.append((msg, len(fds)))
            for fd in fds:
                os.close(fd)
            script = self.scripts.pop(0)
            try:
                script(conn, msg)
            finally:
                conn.close()
        self.sock.close()

    def close(self):
        self.scripts = []
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "d.sock")


def test_call_returns_reply(path):
    d = FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": True, "pong": m["op"]}))
    assert client.call(path, "ping") == {"ok": True, "pong": "ping"}
    assert d.seen[0][0]["v"] == protocol.VERSION


def test_call_raises_rebuilt_error(path):
    err = PolicyError("image", "not allowed in queue batch", "evil:1", "allowed: debian:*")
    FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": False, "error": err.to_wire()}))
    with pytest.raises(PolicyError) as exc:
        client.call(path, "start")
    assert exc.value.message == err.message


def test_not_reachable(path):
    with pytest.raises(DaemonError) as exc:
        client.call(path, "ping")
    assert exc.value.message == (f"cbatch: daemon: not reachable: {path} "
                                 "(is cbatchd running? cbatch check --node)")
    assert exc.value.exit_code == 125


def _session(conn, msg, signals_then_status=None):
    protocol.send(conn, {"ok": True, "event": "started", "id": "c1", "job_id": "1.vm"})
    got = []
    while signals_then_status is not None and len(got) < signals_then_status:
        m, _ = protocol.recv(conn, timeout=5)
        assert m["op"] == "signal"
        got.append(m["signum"])
    protocol.send(conn, {"event": "exit", "status": sum(got) or 3, "oom": False, "message": "cbatch: x: y"})


def test_run_session_exit_status_message_and_fds(path):
    d = FakeDaemon(path, lambda c, m: _session(c, m))
    err = io.StringIO()
    assert client.run_session(path, protocol.request("run", argv=["x"]), (0, 1, 2), err=err) == 3
    assert err.getvalue() == "cbatch: x: y\n"
    assert d.seen[0][1] == 3


def test_signals_are_forwarded(path):
    FakeDaemon(path, lambda c, m: _session(c, m, signals_then_status=1))
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    status = client.run_session(path, protocol.request("run", argv=["x"]), (), err=io.StringIO())
    assert status == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL    # handlers restored


def test_native_calls_on_native(path):
    FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": True, "mode": "native"}))
    called = []

    class Done(Exception):
        pass

    def on_native(pending):
        called.append(pending)
        raise Done()
    with pytest.raises(Done):
        client.run_session(path, protocol.request("start"), (), on_native=on_native)
    assert called == [[]]


def test_lost_daemon_after_start(path, monkeypatch):
    monkeypatch.setattr(client, "REATTACH_FOR", 1.0)
    d = FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": True, "event": "started", "id": "c1"}))
    threading.Thread(target=lambda: (d.thread.join(5), d.close()), daemon=True).start()
    with pytest.raises(DaemonError) as exc:
        client.run_session(path, protocol.request("start"), ())
    # Never "the container was stopped": nobody said so; it may run until cbatchd returns and removes it.
    assert exc.value.message == (f"cbatch: daemon: not reachable: {path} (cbatchd did not come back within 1 s; "
                                 "the job's container may still run until cbatchd returns and removes it)")


def test_daemon_back_without_the_container(path, monkeypatch):
    monkeypatch.setattr(client, "REATTACH_FOR", 5.0)
    first = FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": True, "event": "started", "id": "c1abc",
                                                            "job_id": "7.vm"}))

    def restart():
        first.thread.join(5)
        first.close()
        FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": False, "error": {
            "class": "AccessDenied", "subject": "attach", "problem": "no container is waiting for this client"}}))
    threading.Thread(target=restart, daemon=True).start()
    with pytest.raises(DaemonError) as exc:
        client.run_session(path, protocol.request("start"), ())
    assert exc.value.message == "cbatch: daemon: lost the job's container: c1abc (cbatchd came back and " \
                                "cannot give it back; it removes such containers)"


def test_reattach_when_the_daemon_died_before_started(path):
    """Closed before the ``started`` event: the client attaches as itself (no id) and gets its container."""
    first = FakeDaemon(path, lambda c, m: None)      # takes the start, dies without a word

    def restart():
        first.thread.join(5)
        first.close()
        time.sleep(0.3)

        def attached(c, m):
            if m["op"] == "ping":
                protocol.send(c, {"ok": True})
                return
            assert m["op"] == "attach" and "id" not in m and "job_id" not in m, m
            protocol.send(c, {"ok": True, "event": "attached", "id": "c7", "job_id": "8.vm"})
            protocol.send(c, {"event": "exit", "status": 5, "oom": False, "message": None})
        FakeDaemon(path, attached, attached)
    threading.Thread(target=restart, daemon=True).start()
    assert client.run_session(path, protocol.request("start"), ()) == 5


def test_reattach_after_daemon_restart(path):
    first = FakeDaemon(path, lambda c, m: protocol.send(c, {"ok": True, "event": "started", "id": "c9",
                                                            "job_id": "7.vm"}))

    def restart():
        first.thread.join(5)
        first.close()
        time.sleep(0.7)

        def attached(c, m):
            assert m["op"] == "attach" and m["id"] == "c9" and m["job_id"] == "7.vm"
            protocol.send(c, {"ok": True, "event": "attached", "id": "c9"})
            protocol.send(c, {"event": "exit", "status": 42, "oom": False, "message": None})
        FakeDaemon(path, attached)
    threading.Thread(target=restart, daemon=True).start()
    assert client.run_session(path, protocol.request("start"), ()) == 42
