"""Hostile input to the C client: malformed and fuzzed reply frames, descriptors it never asked for, broken
shims, an over-long stdin line. It never crashes (no signal death), says one line starting ``cbatch: ``
and exits 125 (the hooks: 0, so pbs_mom neither aborts nor requeues the job)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cbatch import protocol
from client_helpers import AS_USER, FakeDaemon, c_client, wd, write_shim  # noqa: F401 - fixtures


def _starter_with(c_client, tmp: Path, replies, raw_fds=None):
    sock = str(tmp / "d.sock")
    daemon = FakeDaemon(sock, replies, raw_fds)
    try:
        shim = write_shim(tmp, "job_starter", sock, c_client)
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


def test_stdin_line_too_long_is_one_line_125(c_client, wd):
    """pbs_mom's line is bounded (the native path must fit it into a pipe): a longer one is refused."""
    sock = str(wd / "d.sock")
    daemon = FakeDaemon(sock, [{"ok": True, "mode": "native"}])
    try:
        shim = write_shim(wd, "job_starter", sock, c_client)
        p = subprocess.run([shim, "/bin/sh"], input=b"x" * 70000 + b"\n", capture_output=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin"}, cwd=str(wd), **AS_USER)
    finally:
        daemon.close()
    assert p.returncode == 125 and p.stderr.startswith(b"cbatch: job starter: stdin line too long"), p.stderr
    assert len(p.stderr.splitlines()) == 1 and not daemon.requests
