"""cbatchd authorisation, against a real daemon over its real socket, with real users and sessions.

Who a client is comes from SO_PEERCRED and /proc only; these tests make real processes (as cbt-alice,
cbt-bob, in their own sessions or not) and check the daemon refuses what it must, logs each refusal, and
keeps serving everyone else. Uses the ``daemon`` fixture (tests/integration/conftest.py).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cbatch import protocol
from cbatch.clients import client
from cbatch.core.errors import AccessDenied
from cbatch.core.job import Registration

PY = str(Path(sys.executable).parent / "python3")
_n = itertools.count(1)

# A client process: optionally drops to a user, optionally forks (so the requester is not the session
# leader), reports its pid/sid, waits for "go" (so the test can register its session first), then sends one
# request and prints the outcome as JSON.
CHILD = textwrap.dedent("""
    import json, os, pwd, sys
    sock, op, user, fork, fields = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "fork", json.loads(sys.argv[5])
    if user != "-":
        pw = pwd.getpwnam(user)
        os.setgroups(os.getgrouplist(user, pw.pw_gid)); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
    if fork:
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status))
    print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "uid": os.getuid()}), flush=True)
    sys.stdin.readline()
    from cbatch.clients import client
    from cbatch.core.errors import CbatchError
    out = []
    for _ in range(int(fields.pop("_repeat", 1))):
        try:
            fds = (0, 1, 2) if op in ("start", "run") else ()
            out.append({"ok": True, "reply": client.call(sock, op, _fds=fds, **fields)})
        except CbatchError as e:
            out.append({"ok": False, "error": e.message, "class": type(e).__name__})
    print(json.dumps(out), flush=True)
""")


class Client:
    """A running CHILD process (a real peer with its own pid, uid and session)."""

    def __init__(self, sock: str, op: str, user: str = "-", *, new_session: bool = True, fork: bool = False,
                 proc_cwd: str = "/", **fields):
        self.proc = subprocess.Popen([PY, "-I", "-c", CHILD, sock, op, user, "fork" if fork else "-",
                                      json.dumps(fields)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=proc_cwd, start_new_session=new_session, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def go(self) -> list:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return out


def _job_id() -> str:
    return f"auth{os.getpid()}-{next(_n)}.vm"


def _script(workdir: Path, owner, job_id: str, body: str = "#!/bin/sh\necho hi\n") -> str:
    path = workdir / f"{job_id}.SC"
    path.write_text(body)
    os.chown(path, owner.uid, owner.gid)
    os.chmod(path, 0o700)
    return str(path)


def _register(daemon, job_id: str, user, script: str, session_id, queue: str = "batch") -> dict:
    reg = Registration.from_prologue_argv([job_id, user.name, user.group, "auth", "nodes=1:ppn=1", queue, "",
                                           script], session_id=session_id)
    return client.call(daemon.socket, "register", registration=reg.to_dict())


def _start_fields(script: str, cwd: str) -> dict:
    return {"argv": ["/usr/libexec/cbatch/job_starter", "/bin/sh"], "line": script + "\n", "cwd": cwd,
            "env": [["PATH", "/bin:/usr/bin"]]}


def _assert_refused(result: dict, *words: str) -> None:
    assert result["ok"] is False, result
    for w in words:
        assert w in result["error"], result


def _assert_logged(daemon, *words: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in daemon.log().splitlines() if "refused" in ln]
        if any(all(w in ln for w in words) for ln in lines):
            return
        time.sleep(0.1)
    pytest.fail(f"no refusal logged with {words}:\n{daemon.log()[-3000:]}")


def _still_serving(daemon) -> None:
    assert client.call(daemon.socket, "ping")["ok"] is True


@pytest.fixture
def registered(daemon):
    """Registers jobs and unregisters them at the end."""
    jobs = []

    def reg(*args, **kw):
        jobs.append(args[0])
        return _register(daemon, *args, **kw)
    yield reg
    for job_id in jobs:
        client.call(daemon.socket, "unregister", job_id=job_id)


def test_start_by_the_registered_session_leader_is_accepted(daemon, alice, workdir, registered):
    """The positive control: the job's own starter (alice, session leader) gets its (native) start."""
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "start", alice.name, proc_cwd=str(workdir), **_start_fields(script, str(workdir)))
    assert c.info["pid"] == c.info["sid"]
    registered(job_id, alice, script, c.info["pid"])
    [res] = c.go()
    assert res["ok"] and res["reply"]["mode"] == "native", res


def test_other_uid_claiming_the_job_is_refused(daemon, alice, bob, workdir, registered):
    """bob's process is the registered session leader of alice's job: still not alice, so refused."""
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "start", bob.name, **_start_fields(script, "/"))
    registered(job_id, alice, script, c.info["pid"])
    [res] = c.go()
    _assert_refused(res, "not the job's owner", f"uid {bob.uid}")
    _assert_logged(daemon, "start", "not the job's owner", f"uid {bob.uid}")
    _still_serving(daemon)
    # and the refused attempt did not use up the job's one start
    [job] = [j for j in client.call(daemon.socket, "status")["jobs"] if j["job_id"] == job_id]
    assert job["started"] is False


def test_other_uid_cbatch_run_in_the_jobs_session_is_refused(daemon, alice, bob, workdir, registered):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "run", bob.name, argv=["true"], options=[], cwd="/", env=[])
    registered(job_id, alice, script, c.info["pid"])
    [res] = c.go()
    _assert_refused(res, "cbatch run", "not the job's owner")
    _assert_logged(daemon, "run", "not the job's owner")
    _still_serving(daemon)


def test_unregistered_job_is_refused(daemon, alice, workdir):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "start", alice.name, **_start_fields(script, "/"))
    [res] = c.go()
    _assert_refused(res, "no registered job has this session", f"pid {c.info['pid']}")
    _assert_logged(daemon, "start", "no registered job", f"pid {c.info['pid']}")
    c = Client(daemon.socket, "run", alice.name, argv=["true"], options=[], cwd="/", env=[])
    [res] = c.go()
    _assert_refused(res, "not inside a registered job")
    _still_serving(daemon)


def test_pid_outside_the_jobs_session_is_refused(daemon, alice, workdir, registered):
    """alice's registered job has session S; alice's processes in another session (or a non-leader in S
    asking to start) are refused."""
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    leader = Client(daemon.socket, "ping", alice.name)
    registered(job_id, alice, script, leader.info["pid"])
    try:
        outsider = Client(daemon.socket, "start", alice.name, **_start_fields(script, "/"))
        [res] = outsider.go()
        _assert_refused(res, "no registered job has this session")
        outsider = Client(daemon.socket, "run", alice.name, argv=["true"], options=[], cwd="/", env=[])
        [res] = outsider.go()
        _assert_refused(res, "not inside a registered job", f"pid {outsider.info['pid']}")
        _assert_logged(daemon, "run", "not inside a registered job", f"pid {outsider.info['pid']}")
        # in no new session: the child shares the test's session, which no job has
        member = Client(daemon.socket, "start", alice.name, new_session=False, **_start_fields(script, "/"))
        assert member.info["sid"] != leader.info["pid"]
        [res] = member.go()
        _assert_refused(res, "no registered job has this session")
    finally:
        leader.go()
    _still_serving(daemon)


def test_session_member_that_is_not_the_leader_cannot_start(daemon, alice, workdir, registered):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "start", alice.name, fork=True, **_start_fields(script, "/"))
    assert c.info["pid"] != c.info["sid"]
    registered(job_id, alice, script, c.info["sid"])
    [res] = c.go()
    _assert_refused(res, "no registered job has this session", f"pid {c.info['pid']}")
    _still_serving(daemon)


@pytest.mark.parametrize("op", ["register", "unregister", "status"])
def test_non_root_root_ops_are_refused(daemon, alice, workdir, op):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    fields = {"register": {"registration": Registration.from_prologue_argv(
                  [job_id, alice.name, alice.group, "x", "", "batch", "", script], session_id=1).to_dict()},
              "unregister": {"job_id": job_id}, "status": {}}[op]
    c = Client(daemon.socket, op, alice.name, **fields)
    [res] = c.go()
    _assert_refused(res, op, "only root may do this", f"uid {alice.uid}")
    assert res["class"] == AccessDenied.__name__
    _assert_logged(daemon, op, "only root", f"uid {alice.uid}")
    assert all(j["job_id"] != job_id for j in client.call(daemon.socket, "status")["jobs"])


def test_second_start_of_the_same_job_is_refused(daemon, alice, workdir, registered):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "start", alice.name, _repeat=2, **_start_fields(script, "/"))
    registered(job_id, alice, script, c.info["pid"])
    first, second = c.go()
    assert first["ok"] and first["reply"]["mode"] == "native", first
    _assert_refused(second, "job already started", job_id)
    _assert_logged(daemon, "start", "already started", job_id)
    _still_serving(daemon)


def test_reregister_replaces_and_allows_a_new_start(daemon, alice, workdir, registered):
    """A rerun job (prologue again, new session) may start again: the registration was replaced."""
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c1 = Client(daemon.socket, "start", alice.name, **_start_fields(script, "/"))
    registered(job_id, alice, script, c1.info["pid"])
    assert c1.go()[0]["ok"]
    c2 = Client(daemon.socket, "start", alice.name, **_start_fields(script, "/"))
    assert _register(daemon, job_id, alice, script, c2.info["pid"])["replaced"] is True
    assert c2.go()[0]["ok"]


def test_script_not_owned_by_the_user_is_refused(daemon, alice, bob, workdir, registered):
    job_id = _job_id()
    script = _script(workdir, bob, job_id)
    c = Client(daemon.socket, "start", alice.name, **_start_fields(script, "/"))
    registered(job_id, alice, script, c.info["pid"])
    [res] = c.go()
    _assert_refused(res, "job script", "not owned by the job's user")


def _raw(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    return s


def test_bad_requests_get_one_error_and_do_not_stop_others(daemon):
    cases = [
        (b"\x00\x00\x00\x05nope!", "malformed message"),
        (struct.pack(">I", protocol.MAX_MESSAGE + 1), "message too large"),
        (protocol.encode({"v": 99, "op": "ping"}), "version mismatch"),
        (protocol.encode({"v": 1, "op": "frobnicate"}), "unknown op"),
        (protocol.encode({"v": 1, "op": "unregister", "job_id": 7}), "bad field: job_id"),
    ]
    for data, words in cases:
        s = _raw(daemon)
        s.sendall(data)
        msg, _ = protocol.recv(s, timeout=10)
        assert msg["ok"] is False and words in _rebuild(msg).message, msg
        assert s.recv(10) == b""       # then closed
        s.close()
    _assert_logged(daemon, "version mismatch", "v=99", "v=1")
    _still_serving(daemon)


def _rebuild(msg):
    from cbatch.core.errors import from_wire
    return from_wire(msg["error"])


def test_slow_partial_frame_is_dropped_while_others_are_served(daemon):
    s = _raw(daemon)
    s.sendall(struct.pack(">I", 100) + b'{"v": 1')
    _still_serving(daemon)
    # Not blocked by the stalled client: the ping was answered while that client was still connected and
    # unanswered (a daemon serving one connection at a time would have dropped it first).
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recv(1)
    s.setblocking(True)
    # Then it is dropped with one error naming the frame timeout (protocol.FRAME_TIMEOUT); 30 s only bounds
    # the wait.
    msg, _ = protocol.recv(s, timeout=30)
    assert msg["ok"] is False and "timed out" in _rebuild(msg).message, msg
    assert s.recv(10) == b""
    s.close()
    _assert_logged(daemon, "timed out")


def test_many_idle_connections_do_not_block_ping(daemon):
    socks = [_raw(daemon) for _ in range(50)]
    try:
        _still_serving(daemon)
    finally:
        for s in socks:
            s.close()
    _still_serving(daemon)


def test_attach_to_a_container_not_waiting_for_you_is_refused(daemon, alice, workdir, registered):
    job_id = _job_id()
    script = _script(workdir, alice, job_id)
    c = Client(daemon.socket, "attach", alice.name, job_id=job_id, id="0" * 64)
    registered(job_id, alice, script, c.info["pid"])
    [res] = c.go()
    _assert_refused(res, "attach", "no container is waiting for this client")
    _assert_logged(daemon, "attach", "no container is waiting")
    _still_serving(daemon)
