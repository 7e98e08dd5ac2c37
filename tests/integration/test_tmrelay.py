"""cbatch.daemon.tmrelay against a real container (network none): the relay listens inside the container's
network namespace and passes only TM requests to the host, bounded, and stops with its session.

pbs_mom is played by a TCP server on the host's loopback that records what reaches it; the job's side is a
socket made in the container's namespace (what a process in the container gets from ``connect``), and one
test goes end to end with bash's /dev/tcp run inside the container as the job's uid.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from cbatch.core.errors import DaemonError
from cbatch.core.spec import ContainerSpec
from cbatch.daemon import tmrelay
from cbatch.engines.docker import Stdio

pytestmark = [pytest.mark.docker, pytest.mark.root]

UID, GID = 4242, 4343
TM_PORT = 15003                  # inside the container: the port libtorque dials ($PBS_MOMPORT)
WAIT = 60.0                      # upper bound of a wait for a moment (never asserted as a duration)


def req(tag: bytes) -> bytes:
    """A TORQUE TM request of the relay's job ``t.job`` (TM_INIT) whose 4-byte cookie is ``tag``, ending in the
    fake mom's ``!`` (tests/unit/test_tmproto.py checks the format against the real pbsdsh)."""
    assert len(tag) == 4
    return b"+5+2+5t.job+4" + tag + b"3+100!"


class FakeMom:
    """A loopback TCP server: records each connection's bytes; answers ``mom-saw:<bytes>\\n`` once it has
    seen a ``!`` (the tests' end of request), then keeps the connection open until the peer closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received: list = []
        self.open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:
        with self.lock:
            self.open += 1
            index = len(self.received)
            self.received.append(b"")
        try:
            answered = False
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                with self.lock:
                    self.received[index] += data
                if not answered and b"!" in self.received[index]:
                    conn.sendall(b"mom-saw:" + self.received[index] + b"\n")
                    answered = True
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        self.sock.close()


def netns_socket(pid: int) -> socket.socket:
    """A TCP socket in the network namespace of ``pid`` (made by a thread that enters it and ends)."""
    out: dict = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
            out["sock"] = socket.socket()
        finally:
            os.close(fd)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out["sock"]


def connect_in(pid: int) -> socket.socket:
    s = netns_socket(pid)
    s.settimeout(WAIT)
    s.connect(("127.0.0.1", TM_PORT))
    return s


def read_to_end(s: socket.socket) -> bytes:
    """Everything until the relay closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def wait_for(cond, what: str) -> None:
    """Wait until ``cond()`` holds (the moment is proven by cond itself; the bound only ends a hang)."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.02)


@pytest.fixture
def container(engine, test_images, helper, unique_instance, tmp_path):
    """A running debian container with network none (the job's): (cid, pid of its init)."""
    outs = []
    for name in ("job.OU", "job.ER"):
        p = tmp_path / name
        p.write_bytes(b"")
        os.chown(p, UID, GID)
        outs.append(str(p))
    spec = ContainerSpec(name="cbt-tmrelay-" + uuid.uuid4().hex[:12], image=test_images["debian"],
                         argv=("sleep", "600"), uid=UID, gid=GID, groups=(), workdir="/",
                         env=(("PATH", "/bin:/usr/bin"),), network="none")
    cid = engine.start(spec, Stdio(*outs), unique_instance, helper)
    try:
        yield cid, engine.container_pid(cid)
    finally:
        engine.remove(cid)


@pytest.fixture
def mom():
    m = FakeMom()
    yield m
    m.close()


@pytest.fixture
def relay_factory(container):
    """relay(**kw) -> a running Relay listening in the container on TM_PORT towards the fake mom."""
    started = []

    def make(target_port: int, **kw) -> tmrelay.Relay:
        cid, pid = container
        listener = tmrelay.open_listener(pid, cid, TM_PORT, 16)
        relay = tmrelay.Relay(listener, ("127.0.0.1", target_port), kw.pop("max_connections", 32),
                              kw.pop("job_id", "t.job"), **kw)
        thread = threading.Thread(target=relay.run, daemon=True)
        thread.start()
        relay.test_thread = thread
        started.append(tmrelay.Running(relay, thread))
        return relay
    yield make
    for running in started:
        tmrelay.stop(running)


def test_tm_request_goes_to_the_mom_and_back_end_to_end(container, mom, relay_factory):
    """The job (its uid, inside the container, bash's /dev/tcp) speaks TM to 127.0.0.1:TM_PORT and gets the
    mom's answer; nothing on the host's side is reachable from the container otherwise (network none)."""
    relay_factory(mom.port)
    cid, _pid = container
    script = (f"exec 3<>/dev/tcp/127.0.0.1/{TM_PORT} && printf '{req(b'job1').decode()}' >&3 && read -r line <&3 && "
              "echo \"$line\"")
    r = subprocess.run(["docker", "exec", "--user", f"{UID}:{GID}", cid, "bash", "-c", script],
                       capture_output=True, timeout=WAIT)
    assert r.returncode == 0 and r.stdout == b"mom-saw:" + req(b"job1") + b"\n", (r.stdout, r.stderr)
    # Without the relay the same is refused: the container's loopback has nothing else on that port.
    r = subprocess.run(["docker", "exec", "--user", f"{UID}:{GID}", cid, "bash", "-c",
                        f"exec 3<>/dev/tcp/127.0.0.1/{mom.port}"], capture_output=True, timeout=WAIT)
    assert r.returncode != 0 and b"Connection refused" in r.stderr, r.stderr


def test_a_tm_header_split_over_reads_is_relayed(container, mom, relay_factory):
    relay_factory(mom.port)
    s = connect_in(container[1])
    for part in (b"+", b"5", b"+2", req(b"job2")[4:9], req(b"job2")[9:]):
        s.sendall(part)
        time.sleep(0.01)        # separate segments (not a timing assertion: only how the bytes arrive)
    assert s.makefile("rb").readline() == b"mom-saw:" + req(b"job2") + b"\n"
    s.close()


@pytest.mark.parametrize("first", [b"+1+2+4job1",           # RM (resource monitor: momctl's) protocol
                                   b"+3+2+4job1",           # IM (inter-mom)
                                   b"+5+1+4job1",           # TM, another version
                                   b"+5+2+5x.job+4cook3+100!",  # TM of another job
                                   b"+5+2+5t.job+4cook3+113!",  # TM_ADOPT (a pid of another namespace)
                                   b"GET / HTTP/1.0\r\n\r\n"])
def test_anything_but_tm_never_reaches_the_mom(container, mom, relay_factory, first):
    relay = relay_factory(mom.port)
    s = connect_in(container[1])
    s.sendall(first)
    assert read_to_end(s) == b""
    assert relay.refused["header"] == 1 and relay.relayed == 0
    assert mom.received == []                     # the host's mom was never connected to


def test_no_header_in_time_is_closed(container, mom, relay_factory):
    relay = relay_factory(mom.port, header_timeout=0.5)
    silent, partial = connect_in(container[1]), connect_in(container[1])
    partial.sendall(b"+5")                         # a right start, then nothing
    assert read_to_end(silent) == b"" and read_to_end(partial) == b""
    assert relay.refused["header"] == 2 and mom.received == []


def test_connections_are_bounded_per_job(container, mom, relay_factory):
    relay = relay_factory(mom.port, max_connections=2)
    held = [connect_in(container[1]) for _ in range(2)]
    for i, s in enumerate(held):
        s.sendall(req(b"job%d" % i))
        assert s.makefile("rb").readline().startswith(b"mom-saw:+5+2")
    extra = connect_in(container[1])               # accepted by the kernel, closed by the relay
    extra.sendall(req(b"job9"))
    assert read_to_end(extra) == b""
    assert relay.refused["bound"] == 1 and mom.open == 2 and len(mom.received) == 2
    held[0].close()                                # one slot frees up...
    wait_for(lambda: len(relay.conns) == 1 and mom.open == 1, "the relay dropped the closed pair")
    again = connect_in(container[1])               # ...and is usable again
    again.sendall(req(b"job3"))
    assert again.makefile("rb").readline() == b"mom-saw:" + req(b"job3") + b"\n"


def test_accepts_are_rate_bounded(container, mom, relay_factory):
    """More connections than the accept budget: all are served in the end (the relay pauses accepting,
    it does not drop), and never more than the bound at once."""
    relay = relay_factory(mom.port, accept_rate=5.0, max_connections=64)
    socks = [connect_in(container[1]) for _ in range(12)]
    for i, s in enumerate(socks):
        s.sendall(req(b"j%03d" % i))
    for i, s in enumerate(socks):
        assert s.makefile("rb").readline() == b"mom-saw:" + req(b"j%03d" % i) + b"\n"
    assert relay.relayed == 12 and relay.refused == {"header": 0, "bound": 0, "mom": 0}


def test_stop_closes_the_listener_and_every_connection(container, mom, relay_factory):
    relay = relay_factory(mom.port)
    s = connect_in(container[1])
    s.sendall(req(b"job1"))
    assert s.makefile("rb").readline() == b"mom-saw:" + req(b"job1") + b"\n"
    relay.stop()
    relay.test_thread.join(WAIT)
    assert not relay.test_thread.is_alive() and relay.conns == []
    assert read_to_end(s) == b""                   # the job's end sees the close
    wait_for(lambda: mom.open == 0, "the mom's end was closed too")
    relay.close()                                  # the listener (the fixture's stop after this is a no-op)
    with pytest.raises(ConnectionRefusedError):
        connect_in(container[1])                   # nothing listens in the container any more


def test_mom_unreachable_closes_the_connection(container, relay_factory):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                    # a port nobody listens on
    port = dead.getsockname()[1]
    relay = relay_factory(port)
    s = connect_in(container[1])
    s.sendall(req(b"job1"))
    assert read_to_end(s) == b""
    assert relay.refused["mom"] == 1
    dead.close()


def test_listener_only_for_the_container_it_names(container):
    cid, pid = container
    with pytest.raises(DaemonError, match="cannot listen in the container"):
        tmrelay.open_listener(pid, "0" * 64, TM_PORT, 4)       # the pid is not that container's
    with pytest.raises(DaemonError):
        tmrelay.open_listener(os.getpid(), cid, TM_PORT, 4)    # a process outside the container


def _pbs_packet(job: bytes, command: bytes = b"3+100", rest: bytes = b"!") -> bytes:
    """One OpenPBS TM packet (tests/unit/test_tmproto.py checks the format against the real pbsdsh)."""
    data = b"+2+2" + b"+%d" % len(job) + job + b"2+32" + b"C" * 32 + command + rest
    return b"PKTV1\0\0" + len(data).to_bytes(4, "big") + data


def test_pbs_tm_packets_of_the_job_go_to_the_mom_and_back(container, mom, relay_factory):
    relay = relay_factory(mom.port, job_id="7.vm", batch="pbs")
    s = connect_in(container[1])
    first, second = _pbs_packet(b"7.vm"), _pbs_packet(b"7.vm", b"3+102", b"+0+1+9/bin/true!")
    s.sendall(first[:9])
    s.sendall(first[9:] + second)
    line = s.makefile("rb").readline()
    assert line.startswith(b"mom-saw:" + first[:12]) and relay.relayed == 1, line
    wait_for(lambda: mom.received and mom.received[0] == first + second, "both packets reached the mom")


@pytest.mark.parametrize("later", [_pbs_packet(b"8.vm"),                          # another job's
                                   _pbs_packet(b"7.vm", b"3+113"),                # TM_ATTACH
                                   b"PKTV1\0\0\0\0\0\x09+1+1+3abc",               # RM
                                   b"GET / HTTP/1.0\r\n\r\n"])
def test_pbs_relay_checks_every_packet(container, mom, relay_factory, later):
    """A good first request opens the connection; a later packet that is not a TM request of this job closes
    it before any of its bytes reach the mom."""
    relay = relay_factory(mom.port, job_id="7.vm", batch="pbs")
    s = connect_in(container[1])
    first = _pbs_packet(b"7.vm")
    s.sendall(first)
    assert s.makefile("rb").readline().startswith(b"mom-saw:")
    s.sendall(later)
    assert read_to_end(s) == b""
    assert relay.refused["header"] == 1
    wait_for(lambda: mom.open == 0, "the mom's end was closed")
    assert mom.received == [first]


@pytest.mark.parametrize("first", [_pbs_packet(b"8.vm"), b"+2+2+47.vm", b"+5+2+4job1!",
                                   b"PKTV1\0\0\0\0\0\x09+1+1+3abc"])
def test_pbs_relay_never_connects_for_anything_else(container, mom, relay_factory, first):
    relay = relay_factory(mom.port, job_id="7.vm", batch="pbs")
    s = connect_in(container[1])
    s.sendall(first)
    assert read_to_end(s) == b""
    assert relay.refused["header"] == 1 and relay.relayed == 0 and mom.received == []
