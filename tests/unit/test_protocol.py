"""cbatch.protocol: framing, descriptors over SCM_RIGHTS, limits and typed field validation."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading

import pytest

from cbatch import protocol
from cbatch.core.errors import DaemonError, from_wire


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_roundtrip(pair):
    a, b = pair
    msg = protocol.request("ping", text="héllo \udcff", n=3)
    protocol.send(a, msg)
    got, fds = protocol.recv(b, timeout=2)
    assert got == msg and fds == []
    assert got["v"] == protocol.VERSION


def test_frame_is_big_endian_length_then_json(pair):
    a, b = pair
    protocol.send(a, {"v": 1, "op": "ping"})
    raw = b.recv(100)
    (size,) = struct.unpack(">I", raw[:4])
    assert size == len(raw) - 4
    assert json.loads(raw[4:]) == {"v": 1, "op": "ping"}


def test_several_frames_in_a_row(pair):
    a, b = pair
    for i in range(5):
        protocol.send(a, {"i": i})
    assert [protocol.recv(b, timeout=1)[0]["i"] for _ in range(5)] == list(range(5))


def test_fds_travel_and_are_cloexec(pair, tmp_path):
    a, b = pair
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY)
    r, w = os.pipe()
    try:
        protocol.send(a, {"op": "x"}, fds=(r, w, fd))
        got, fds = protocol.recv(b, timeout=2)
        assert got == {"op": "x"} and len(fds) == 3
        for f in fds:
            assert not os.get_inheritable(f)
        assert os.fstat(fds[2]).st_ino == os.stat(path).st_ino
        os.write(fds[1], b"via passed fd")
        assert os.read(r, 100) == b"via passed fd"
        for f in fds:
            os.close(f)
    finally:
        for f in (r, w, fd):
            os.close(f)


def test_too_many_fds_refused_on_send(pair):
    a, _ = pair
    with pytest.raises(DaemonError, match="too many descriptors"):
        protocol.send(a, {"op": "x"}, fds=(0, 1, 2, 0))


def test_too_many_fds_refused_on_receive_and_closed(pair):
    import array
    a, b = pair
    data = protocol.encode({"op": "x"})
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(6)]
    try:
        a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        with pytest.raises(DaemonError, match="too many descriptors"):
            protocol.recv(b, timeout=1)
    finally:
        for f in fds:
            os.close(f)


def test_clean_close_between_frames(pair):
    a, b = pair
    a.close()
    with pytest.raises(protocol.Closed):
        protocol.recv(b, timeout=1)


def test_truncated_header(pair):
    a, b = pair
    a.sendall(b"\x00\x00")
    a.close()
    with pytest.raises(DaemonError, match="truncated") as exc:
        protocol.recv(b, timeout=1)
    assert not isinstance(exc.value, protocol.Closed)


def test_truncated_body(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 100) + b'{"op": ')
    a.close()
    with pytest.raises(DaemonError, match="truncated"):
        protocol.recv(b, timeout=1)


def test_oversized_frame_refused_without_reading_it(pair):
    a, b = pair
    a.sendall(struct.pack(">I", protocol.MAX_MESSAGE + 1))
    with pytest.raises(DaemonError, match="too large"):
        protocol.recv(b, timeout=1)


def test_oversized_object_refused_on_send(pair):
    a, _ = pair
    with pytest.raises(DaemonError, match="too large"):
        protocol.send(a, {"blob": "x" * protocol.MAX_MESSAGE})


def test_max_size_frame_accepted(pair):
    a, b = pair
    filler = "x" * (protocol.MAX_MESSAGE - len(json.dumps({"b": ""}, separators=(",", ":"))))
    t = threading.Thread(target=protocol.send, args=(a, {"b": filler}))
    t.start()
    got, _ = protocol.recv(b, timeout=5)
    t.join()
    assert len(got["b"]) == len(filler)


def test_partial_frame_times_out(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 50) + b"{")
    # No timeout for the first byte: only the frame's own timeout can end this wait with "timed out" (were
    # it ignored, the closer below ends it after 60 s with "truncated message" instead).
    closer = threading.Timer(60, a.close)
    closer.start()
    try:
        with pytest.raises(DaemonError, match="timed out"):
            protocol.recv(b, timeout=None, frame_timeout=0.3)
    finally:
        closer.cancel()


def test_idle_timeout(pair):
    _, b = pair
    with pytest.raises(DaemonError, match="timed out"):
        protocol.recv(b, timeout=0.2)


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1, 2]", b'"str"', b"null"])
def test_malformed_body(pair, body):
    a, b = pair
    a.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(DaemonError, match="malformed"):
        protocol.recv(b, timeout=1)


@pytest.mark.parametrize("v", [None, 0, 2, "1", True])
def test_wrong_version_names_both(v):
    msg = {"op": "ping"} if v is None else {"v": v, "op": "ping"}
    with pytest.raises(DaemonError) as exc:
        protocol.check_version(msg)
    assert "version mismatch" in exc.value.message
    assert f"v={protocol.VERSION}" in exc.value.message and repr(v) in exc.value.message


def test_version_ok_returns_op():
    assert protocol.check_version(protocol.request("start")) == "start"


def test_op_must_be_string():
    with pytest.raises(DaemonError, match="cbatch: request: bad field: op"):
        protocol.check_version({"v": 1, "op": 5})


@pytest.mark.parametrize("getter,value", [
    (protocol.get_str, 5), (protocol.get_str, ["a"]), (protocol.get_str, "a\0b"),
    (protocol.get_int, "5"), (protocol.get_int, True), (protocol.get_int, 1.5),
    (protocol.get_bool, 1), (protocol.get_bool, "true"),
    (protocol.get_str_list, "a"), (protocol.get_str_list, ["a", 1]), (protocol.get_str_list, {"a": 1}),
    (protocol.get_pairs, [["a"]]), (protocol.get_pairs, [["a", 1]]), (protocol.get_pairs, {"a": "b"}),
    (protocol.get_pairs, [("a", "b", "c")]),
])
def test_wrong_types(getter, value):
    with pytest.raises(DaemonError) as exc:
        getter({"f": value}, "f")
    assert exc.value.message.startswith("cbatch: request: bad field: f")


def test_missing_field_and_defaults():
    with pytest.raises(DaemonError, match="bad field: name"):
        protocol.get_str({}, "name")
    assert protocol.get_str({}, "name", "d") == "d"
    assert protocol.get_str({"name": None}, "name", None) is None
    assert protocol.get_int({"n": 4}, "n", lo=1, hi=64) == 4
    with pytest.raises(DaemonError, match="bad field: n"):
        protocol.get_int({"n": 65}, "n", lo=1, hi=64)
    assert protocol.get_pairs({"env": [["A", "1"], ["B", "2"]]}, "env") == (("A", "1"), ("B", "2"))
    assert protocol.get_str_list({"argv": ["a", "b"]}, "argv") == ["a", "b"]
    assert protocol.get_bool({"x": False}, "x") is False


def test_env_pairs_survive_non_utf8(pair):
    a, b = pair
    env = {"A": "1", "B": b"\xff\xfe".decode("utf-8", "surrogateescape")}
    protocol.send(a, protocol.request("start", env=protocol.env_pairs(env.items())))
    got, _ = protocol.recv(b, timeout=1)
    assert dict(protocol.get_pairs(got, "env")) == env


def test_error_reply_roundtrip(pair):
    a, b = pair
    err = protocol.bad_field("signum", "an integer")
    protocol.send(a, {"ok": False, "error": err.to_wire()})
    got, _ = protocol.recv(b, timeout=1)
    again = from_wire(got["error"])
    assert again.message == err.message and isinstance(again, DaemonError)
