"""Both clients (the Python reference and the static C ``cbatch-client``) against one fake cbatchd.

- golden frames (tests/golden/*.json): each case runs the real shim (or ``cbatch run``) of BOTH clients; the
  request the fake daemon receives must equal the golden one (and the two clients' frames be byte for byte
  the same), the descriptors must arrive, and status/stdout/stderr must be the golden ones;
- signals forwarded, SIGTERM re-raised, dispositions kept for a native job, an oversized request refused;
  malformed and fuzzed frames: tests/integration/test_client_hostile.py;
- SIGKILLing the C starter (or the C ``cbatch run``) closes its connection, which the daemon takes as
  "remove the container" (tests/integration/test_client_sigkill.py proves the removal with the real engine).

No root, no engine: the daemon here is a socket that answers what the golden file says.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cbatch import protocol
from client_helpers import AS_USER, ROOT, FakeDaemon, c_client, wd, write_shim  # noqa: F401 - fixtures

GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.json"))


def _run_case(case: dict, client, tmp: Path):
    sock = str(tmp / "d.sock")
    daemon = FakeDaemon(sock, case["replies"])
    env = {k: v for k, v in case_env(case)}
    try:
        if case["role"] == "run":
            argv = ([client, "run"] if client else [sys.executable, "-I", "-m", "cbatch.cli", "run"]) \
                + ["--socket", sock] + case["args"]
        else:
            argv = [write_shim(tmp, case["role"], sock, client)] + case["args"]
        stdin = subprocess.PIPE if case["stdin"] is not None else subprocess.DEVNULL
        p = subprocess.run(argv, input=(case["stdin"] or "").encode() if stdin == subprocess.PIPE else None,
                           stdin=None if stdin == subprocess.PIPE else stdin, capture_output=True, env=env,
                           cwd=str(tmp), timeout=60, **AS_USER)
    finally:
        daemon.close()
    return p, daemon, argv


def case_env(case):
    golden = (case["request"] or {}).get("env")
    if golden is not None:
        return [tuple(kv) for kv in golden]
    return [("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8")]


def _expected(case, argv, tmp: Path) -> dict:
    def sub(v):
        if v == "<shim>":
            return argv[0]
        if v == "<cwd>":
            return str(tmp)
        if v == "<ppid>":
            return os.getpid()
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v
    return sub(case["request"])


@pytest.mark.parametrize("client_kind", ["python", "c"])
@pytest.mark.parametrize("golden", GOLDEN, ids=[g.stem for g in GOLDEN])
def test_golden_frames(golden, client_kind, c_client, wd):
    case = json.loads(golden.read_text())
    p, daemon, argv = _run_case(case, c_client if client_kind == "c" else None, wd)
    if case["request"] is None:
        assert not daemon.requests
        assert (p.returncode, p.stdout.decode(), p.stderr.decode()) == (case["status"], case["stdout"], case["stderr"])
        return
    assert daemon.requests, p.stderr
    got = dict(daemon.requests[0])
    if "registration" in got:
        reg = dict(got["registration"])
        assert isinstance(reg.pop("registered_at"), float)
        got["registration"] = dict(reg, registered_at="<time>")
    assert got == _expected(case, argv, wd)
    assert len(daemon.requests) == 1
    assert len(daemon.fds) == case["fds"]
    assert (p.returncode, p.stdout.decode(), p.stderr.decode("utf-8", "replace")) == \
        (case["status"], case["stdout"], case["stderr"])


@pytest.mark.parametrize("golden", [g for g in GOLDEN if "registration" not in g.read_text()
                                    and json.loads(g.read_text())["request"]],
                         ids=lambda g: g.stem)
def test_both_clients_send_the_same_bytes(golden, c_client, wd):
    """Byte for byte: the C writer is Python's json.dumps(ensure_ascii=True, separators=(",", ":")),
    surrogateescape'd environment bytes and astral characters included."""
    case = json.loads(golden.read_text())
    frames = []
    for client in (None, c_client):
        d = wd / ("cc" if client else "py")
        d.mkdir()
        d.chmod(0o755)
        _, daemon, argv = _run_case(case, client, d)
        frames.append(daemon.raw[0].replace(str(d).encode(), b"<dir>"))
    assert frames[0] == frames[1]


@pytest.mark.parametrize("client_kind", ["python", "c"])
def test_native_job_keeps_the_signal_dispositions_it_was_given(client_kind, c_client, wd):
    """The client ignores SIGPIPE and catches the forwarded signals for itself only: the natively exec'ed
    job sees exactly what pbs_mom gave the starter (here: SIGHUP ignored, SIGPIPE default)."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = write_shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
        def given():
            import signal
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        p = subprocess.run([shim, "/bin/sh"], input=b"grep SigIgn /proc/$$/status\n", capture_output=True,
                           env={"PATH": "/usr/bin:/bin"}, cwd=str(wd), timeout=60, preexec_fn=given, **AS_USER)
    finally:
        daemon.close()
    ignored = int(p.stdout.split()[1], 16)
    assert ignored & (1 << (1 - 1)), p.stdout          # SIGHUP (1) still ignored
    assert not ignored & (1 << (13 - 1)), p.stdout     # SIGPIPE (13) not


class SignalDaemon(FakeDaemon):
    """Answers a start with ``started``, records the frames that follow (raw), and ends the session with an
    exit event once it got a SIGTERM frame."""

    def __init__(self, path: str) -> None:
        self.session = []
        self.started = threading.Event()
        super().__init__(path, [])

    def _one(self, conn) -> None:
        msg, fds = protocol.recv(conn, timeout=20)
        for fd in fds:
            os.close(fd)
        self.requests.append(msg)
        protocol.send(conn, {"ok": True, "event": "started", "id": "c1", "job_id": "9.sig"})
        self.started.set()
        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
            self.session.append(body)
            if protocol.decode(body).get("signum") == 15:
                protocol.send(conn, {"event": "exit", "status": 143, "oom": False, "message": ""})
                return


@pytest.mark.parametrize("client_kind", ["python", "c"])
def test_signals_are_forwarded_and_sigterm_reraised(client_kind, c_client, wd):
    """SIGUSR1 and SIGTERM reach the daemon as signal frames (the same bytes from both clients); after the
    exit event the starter that got SIGTERM itself dies of SIGTERM (TORQUE then records 271)."""
    import signal
    sock = str(wd / "d.sock")
    daemon = SignalDaemon(sock)
    try:
        shim = write_shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
        p = subprocess.Popen([shim, "/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, cwd=str(wd), **AS_USER)
        p.stdin.write(b"/x.sh\n")
        p.stdin.flush()
        assert daemon.started.wait(60)
        p.send_signal(signal.SIGUSR1)
        while not daemon.session and p.poll() is None:
            threading.Event().wait(0.01)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        daemon.close()
    assert daemon.session == [b'{"v":1,"op":"signal","signum":10}', b'{"v":1,"op":"signal","signum":15}']
    assert p.returncode == -signal.SIGTERM, err


@pytest.mark.parametrize("client_kind", ["python", "c"])
def test_an_environment_over_the_frame_limit_is_one_line_125(client_kind, c_client, wd):
    """A user's 1.2 MB environment cannot make a frame the daemon would refuse: the client says so itself."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = write_shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
        p = subprocess.run([shim, "/bin/sh"], input=b"/x.sh\n", capture_output=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", **{f"BIG{i}": "x" * 100000 for i in range(12)}}, cwd=str(wd), **AS_USER)
    finally:
        daemon.close()
    assert p.returncode == 125, p.stderr[-300:]
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"cbatch: protocol: message too large: 12\d{5}\d? bytes \(at most 1048576 bytes\)", lines[0]), lines
    assert not daemon.requests
