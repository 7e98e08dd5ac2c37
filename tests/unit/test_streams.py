"""cbatch.daemon.streams: the proxy's own descriptors and its stop (issue #9.2), without an engine.

A socketpair stands in for Docker's attach socket (frames: 8-byte header + payload)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading
import time

from cbatch.daemon import streams


def _frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_pump_blocked_on_a_full_pipe_stops_when_asked():
    engine_end, daemon_end = socket.socketpair()
    r, w = os.pipe()                       # the client's stdout: nobody reads it
    p = streams.Pump(daemon_end, None, w, None)
    t = threading.Thread(target=p.run)
    t.start()
    sender = threading.Thread(target=engine_end.sendall, args=(_frame(1, b"x" * (1 << 20)),), daemon=True)
    sender.start()
    # The moment under test: the pipe is full and the pump has more to write.
    deadline = time.monotonic() + 30
    while struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, bytes(4)))[0] < 65536:
        assert time.monotonic() < deadline, "the pipe never filled"
        time.sleep(0.01)
    p.stop()
    t.join(10)
    assert not t.is_alive()
    p.close()
    assert os.get_blocking(w)              # the client's own descriptor's flags were never changed
    os.close(r), os.close(w)
    engine_end.close(), daemon_end.close()


def test_pump_copies_frames_and_stdin_byte_exact():
    engine_end, daemon_end = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, b"input-bytes")
    os.close(in_w)
    engine_end.sendall(_frame(1, b"out-1 ") + _frame(2, b"err-1") + _frame(1, b"out-2"))
    t = threading.Thread(target=streams.pump, args=(daemon_end, in_r, out_w, err_w))
    t.start()
    got = b""
    while not got.endswith(b"input-bytes"):
        got += engine_end.recv(100)
    assert engine_end.recv(100) == b""     # stdin's EOF shut the socket's write side
    engine_end.close()
    t.join(10)
    assert not t.is_alive()
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    assert os.read(out_r, 100) == b"out-1 out-2" and os.read(err_r, 100) == b"err-1"


def test_write_only_fifo_is_never_read_through_root(tmp_path):
    """A FIFO the client may only write to (someone else's, 0622) handed over as stdin: root must not
    re-open it for reading (that would read the owner's data into the client's container)."""
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o622)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    os.write(w, b"secret")
    ep = streams.Endpoint(w, writing=False)
    assert ep.fd == -1
    ep.close()
    assert os.read(reader, 100) == b"secret"      # still there: nobody read it
    ro = streams.Endpoint(reader, writing=True)   # and a read-only one is not written through
    assert ro.fd == -1
    for fd in (reader, w):
        os.close(fd)
