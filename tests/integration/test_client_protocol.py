"""Both clients (the Python reference and the static C ``cbatch-client``) against one fake cbatchd.

- golden frames (tests/golden/*.json): each case runs the real shim (or ``cbatch run``) of BOTH clients; the
  request the fake daemon receives must equal the golden one (and the two clients' frames be byte for byte
  the same), the descriptors must arrive, and status/stdout/stderr must be the golden ones;
- malformed and fuzzed frames to the C client: it never crashes (no signal death), prints one line starting
  ``cbatch: `` and exits 125;
- SIGKILLing the C starter (or the C ``cbatch run``) closes its connection, which the daemon takes as
  "remove the container" (tests/integration/test_client_sigkill.py proves the removal with the real engine).

No root, no engine: the daemon here is a socket that answers what the golden file says.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from cbatch import protocol
from cbatch.admin import install
from cbatch.clients import cclient

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.json"))


@pytest.fixture(scope="module")
def c_client():
    """The C client: ``$CBATCH_CLIENT``, or built here with ``make -C libexec cbatch-client``."""
    if os.environ.get(cclient.ENV_CLIENT):
        return os.environ[cclient.ENV_CLIENT]
    built = ROOT / "libexec" / cclient.CLIENT_NAME      # this checkout's (the package may be installed elsewhere)
    if not shutil.which("musl-gcc") and not built.exists():
        pytest.skip("musl-gcc not installed (apt-get install musl-tools)")
    subprocess.run(["make", "-s", "-C", str(ROOT / "libexec"), "cbatch-client"], check=True)
    return str(built)


class FakeDaemon:
    """Accepts connections on a unix socket; the first request gets ``replies`` (frames or raw bytes), later
    ones (a reattach, a ping) an error reply; then the connection is closed."""

    def __init__(self, path: str, replies, raw_fds=None) -> None:
        self.path, self.replies, self.raw_fds = path, replies, raw_fds
        self.requests, self.raw, self.fds = [], [], []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except Exception:       # noqa: BLE001 - a client that went away is the test's business
                    pass

    def _one(self, conn) -> None:
        conn.settimeout(20)
        head, anc, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(16), socket.MSG_WAITALL)
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
        (size,) = struct.unpack(">I", head)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise EOFError
            body += chunk
        first = not self.requests
        self.raw.append(body)
        self.requests.append(protocol.decode(body))
        for fd in fds:
            self.fds.append(os.fstat(fd).st_ino)
            os.close(fd)
        if not first:
            protocol.send(conn, {"ok": False, "error": {"subject": "daemon", "problem": "refused"}})
            return
        for reply in self.replies:
            if isinstance(reply, bytes):
                if self.raw_fds:
                    conn.sendmsg([reply[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                struct.pack(f"{len(self.raw_fds)}i", *self.raw_fds))])
                    conn.sendall(reply[1:])
                else:
                    conn.sendall(reply)
            else:
                protocol.send(conn, reply)
        conn.shutdown(socket.SHUT_WR)
        try:
            conn.settimeout(10)
            while conn.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


NOBODY = 65534
# The starter drops to the script's owner when it runs as root: run the clients as nobody, as pbs_mom would
# run a job user's starter.
AS_USER = {"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}


@pytest.fixture
def wd():
    """A directory nobody can enter (pytest's wd is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="cbatch-golden-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _shim(tmp: Path, role: str, sock: str, client) -> str:
    path = tmp / role
    text = install.shim_text(role, sock, sys.executable, client)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _run_case(case: dict, client, tmp: Path):
    sock = str(tmp / "d.sock")
    daemon = FakeDaemon(sock, case["replies"])
    env = {k: v for k, v in case_env(case)}
    try:
        if case["role"] == "run":
            argv = ([client, "run"] if client else [sys.executable, "-I", "-m", "cbatch.cli", "run"]) \
                + ["--socket", sock] + case["args"]
        else:
            argv = [_shim(tmp, case["role"], sock, client)] + case["args"]
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


def _starter_with(c_client, tmp: Path, replies, raw_fds=None):
    sock = str(tmp / "d.sock")
    daemon = FakeDaemon(sock, replies, raw_fds)
    try:
        shim = _shim(tmp, "job_starter", sock, c_client)
        return subprocess.run([shim, "/bin/sh"], input=b"/x.sh\n", capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp), **AS_USER), daemon
    finally:
        daemon.close()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


MALFORMED = {
    "truncated_header": b"\x00\x00",
    "too_large": b"\xff\xff\xff\xff" + b"{}",
    "not_json": _frame(b"hello"),
    "array": _frame(b"[1,2]"),
    "null": _frame(b"null"),
    "deep": _frame(b"[" * 100000 + b"]" * 100000),
    "deep_object": _frame(b'{"a":' * 5000 + b"1" + b"}" * 5000),
    "not_utf8": _frame(b'{"event":"\xff"}'),
    "nul_in_json": _frame(b'{"event":"exit"\x00}'),
    "unterminated": _frame(b'{"event":"exit","status":'),
    "bad_escape": _frame(b'{"ok":false,"error":{"subject":"\\uZZZZ"}}'),
    "truncated_body": struct.pack(">I", 50) + b'{"event":',
    "no_event": _frame(b'{"ok":true}'),
    "bad_event_type": _frame(b'{"ok":true,"event":7}'),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_one_line_125(name, c_client, wd):
    p, _ = _starter_with(c_client, wd, [MALFORMED[name]])
    lines = p.stderr.decode("utf-8", "replace").splitlines()
    assert p.returncode == 125, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("cbatch: "), p.stderr


def test_descriptors_from_the_daemon_are_closed_not_used(c_client, wd):
    """A frame carrying SCM_RIGHTS (the daemon never sends any) still gives one line and 125."""
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        p, _ = _starter_with(c_client, wd, [_frame(b'{"ok":true,"event":"bogus"}')], raw_fds=[fd, fd])
    finally:
        os.close(fd)
    assert p.returncode == 125 and len(p.stderr.splitlines()) == 1, p.stderr


def _mutants(seed: int, n: int):
    rnd = random.Random(seed)
    valid = [protocol.encode(r)[4:] for r in (
        {"ok": True, "event": "started", "id": "abc", "job_id": "1"},
        {"ok": False, "error": {"subject": "s", "problem": "p", "value": "v", "hint": "h", "exit_code": 125}},
        {"event": "exit", "status": 3, "message": "m\u00e9"})]
    for i in range(n):
        if i % 3 == 0:
            body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
        else:
            body = bytearray(rnd.choice(valid))
            for _ in range(rnd.randrange(1, 4)):
                body[rnd.randrange(len(body))] = rnd.randrange(256)
            body = bytes(body)
        yield body


def test_fuzzed_frames_never_crash(c_client, wd):
    """Random and bit-flipped frames: never a signal death; a frame Python's decoder refuses gives one line
    and 125 (one that still decodes is a valid reply and is answered as one)."""
    for i, body in enumerate(_mutants(1303, 240)):
        d = wd / str(i)
        d.mkdir()
        d.chmod(0o755)
        try:
            protocol.decode(body)
            malformed = False
        except Exception:       # noqa: BLE001
            malformed = True
        p, _ = _starter_with(c_client, d, [_frame(body)])
        assert p.returncode >= 0, (body, p.returncode)
        if malformed:
            assert p.returncode == 125 and len(p.stderr.splitlines()) == 1 \
                and p.stderr.startswith(b"cbatch: "), (body, p.stderr)
        shutil.rmtree(d)


def test_bad_shims_fail_closed(c_client, wd):
    """A broken C shim: the hooks still exit 0 (pbs_mom would abort or requeue otherwise), the starter 125."""
    for role, status in (("prologue", 0), ("epilogue", 0), ("job_starter", 125)):
        shim = wd / role
        shim.write_text(f"#!{c_client} shim\nrole {role}\nbogus line\n")
        shim.chmod(0o755)
        p = subprocess.run([str(shim)], capture_output=True, stdin=subprocess.DEVNULL, timeout=30, **AS_USER)
        assert p.returncode == status and len(p.stderr.splitlines()) == 1, (role, p.stderr)


@pytest.mark.parametrize("client_kind", ["python", "c"])
def test_native_job_keeps_the_signal_dispositions_it_was_given(client_kind, c_client, wd):
    """The client ignores SIGPIPE and catches the forwarded signals for itself only: the natively exec'ed
    job sees exactly what pbs_mom gave the starter (here: SIGHUP ignored, SIGPIPE default)."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = _shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
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
        shim = _shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
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


def test_stdin_line_too_long_is_one_line_125(c_client, wd):
    """pbs_mom's line is bounded (the native path must fit it into a pipe): a longer one is refused."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = _shim(wd, "job_starter", sock, c_client)
        p = subprocess.run([shim, "/bin/sh"], input=b"x" * 70000 + b"\n", capture_output=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin"}, cwd=str(wd), **AS_USER)
    finally:
        daemon.close()
    assert p.returncode == 125 and p.stderr.startswith(b"cbatch: job starter: stdin line too long"), p.stderr
    assert len(p.stderr.splitlines()) == 1 and not daemon.requests


@pytest.mark.parametrize("client_kind", ["python", "c"])
def test_an_environment_over_the_frame_limit_is_one_line_125(client_kind, c_client, wd):
    """A user's 1.2 MB environment cannot make a frame the daemon would refuse: the client says so itself."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = _shim(wd, "job_starter", sock, c_client if client_kind == "c" else None)
        p = subprocess.run([shim, "/bin/sh"], input=b"/x.sh\n", capture_output=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", **{f"BIG{i}": "x" * 100000 for i in range(12)}}, cwd=str(wd), **AS_USER)
    finally:
        daemon.close()
    assert p.returncode == 125, p.stderr[-300:]
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"cbatch: protocol: message too large: 12\d{5}\d? bytes \(at most 1048576 bytes\)", lines[0]), lines
    assert not daemon.requests
