"""cbatch.daemon.tmproto: the TM relay's gates. OpenPBS: every packet must be a TM request of the relay's own
job (never RM, never another job, never TM_ATTACH, bounded); TORQUE: the first request, the same way. The real
clients' bytes are taken from the real pbsdsh where it is installed (it dials a listener of this test)."""

import os
import socket
import subprocess
import threading

import pytest

from cbatch.daemon import tmproto
from cbatch.daemon.tmproto import BAD, NEED, PASS

JOB = "12.vm"


def dis_uint(value: int, sign: str = "+") -> bytes:
    """DIS as OpenPBS's diswui_/diswsi write it (an independent encoder, to check the reader)."""
    digits = str(value)
    out, n = sign + digits, len(digits)
    while n > 1:
        out, n = str(n) + out, len(str(n))
    return out.encode()


def dis_str(text: bytes) -> bytes:
    return dis_uint(len(text)) + text


def request(job: str = JOB, cookie: bytes = b"C0FFEE" * 5, command: int = 100, proto: bytes = tmproto.PBS_TM,
            rest: bytes = b"+7+1") -> bytes:
    return proto + dis_str(job.encode()) + dis_str(cookie) + dis_uint(command) + rest


def packet(data: bytes, kind: int = 0, length=None) -> bytes:
    size = len(data) if length is None else length
    return tmproto.PBS_MAGIC + bytes([kind]) + size.to_bytes(4, "big") + data


@pytest.mark.parametrize("value", [0, 5, 9, 10, 12, 99, 123, 1000, 65535, 1234567890, 4294967295])
def test_dis_numbers_read_back(value):
    data = dis_uint(value) + b"tail"
    assert tmproto.dis_int(data, 0) == (value, len(data) - 4)
    assert tmproto.dis_int(dis_uint(value, "-"), 0) == (-value, len(dis_uint(value)))


@pytest.mark.parametrize("data,verdict", [(b"", NEED), (b"2", NEED), (b"2+1", NEED), (b"x", BAD), (b"0+1", BAD),
                                          (b"2+1x", BAD), (b"3+1", NEED), (b"211+12345678901", BAD), (b"1111+7", BAD),
                                          (b"99999", NEED), (b"9999999999", BAD)])
def test_dis_numbers_incomplete_or_malformed(data, verdict):
    assert tmproto.dis_int(data, 0) == verdict


def test_a_tm_request_of_the_job_passes_whole_or_byte_by_byte():
    wire = packet(request()) + packet(request(command=102, rest=b"+0+2" + dis_str(b"/bin/true")))
    assert tmproto.PbsGate(JOB).feed(wire) == PASS
    gate, verdicts = tmproto.PbsGate(JOB), []
    for i in range(len(wire)):
        verdicts.append(gate.feed(wire[i:i + 1]))
    first_done = len(tmproto.PBS_MAGIC) + 5 + len(request()) - len(b"+7+1")
    assert set(verdicts[:first_done - 1]) == {NEED} and set(verdicts[first_done - 1:]) == {PASS}


@pytest.mark.parametrize("kind", [0, 1, 0x7F, 0xFF])
def test_the_packet_type_byte_is_not_judged(kind):
    # dis_puts never sets it: the client sends whatever its buffer held.
    assert tmproto.PbsGate(JOB).feed(packet(request(), kind)) == PASS


@pytest.mark.parametrize("wire", [
    packet(request(job="13.vm")),                                   # another job's id
    packet(request(job="12.vm2")),                                  # this id as a prefix of another
    packet(request(job="2.vm")),
    packet(request(proto=b"+1+1")),                                 # RM (resource monitor) protocol
    packet(request(proto=b"+2+1")),                                 # TM, old version
    packet(request(command=113)),                                   # TM_ATTACH (pbs_attach)
    packet(request(command=99)), packet(request(command=999)),
    packet(request(cookie=b"c" * (tmproto.MAX_COOKIE + 1))),
    packet(request(), length=0),
    packet(request(), length=tmproto.MAX_PACKET + 1),
    b"PKTV2\0" + packet(request())[6:],                             # wrong magic
    b"GET / HTTP/1.0\r\n\r\n",
    b"+2+2" + dis_str(JOB.encode()),                                # TM without the packet framing
    packet(request()[:12]) + packet(request()),                     # a packet that ends inside the request start
    packet(request()) + packet(request(job="13.vm")),               # a good request, then another job's
    packet(request()) + packet(b"+1+1" + dis_str(b"status")),       # a good request, then RM
    packet(request()) + b"PKTV1x",                                  # a good packet, then garbage
])
def test_anything_else_is_refused(wire):
    assert tmproto.PbsGate(JOB).feed(wire) == BAD


def test_a_packet_body_is_passed_as_it_comes():
    body = request() + b"x" * 100000
    gate = tmproto.PbsGate(JOB)
    head = packet(body)[:5000]
    assert gate.feed(head) == PASS
    assert gate.feed(body[5000 - tmproto.PBS_HEAD:]) == PASS        # the rest of it: not inspected
    assert gate.feed(packet(request(command=104, rest=b"+3"))) == PASS
    assert gate.feed(packet(request(job="x"))) == BAD


def test_the_request_start_is_bounded():
    # The longest request start that can pass (a 1024-byte cookie) is held until it is complete; the gate
    # buffers at most that much, and a number with too many digits is refused at once.
    gate = tmproto.PbsGate(JOB)
    start = tmproto.PBS_TM + dis_str(JOB.encode()) + dis_uint(tmproto.MAX_COOKIE)
    assert gate.feed(packet(start + b"c" * 500, length=10 ** 6)) == NEED
    assert gate.feed(b"c" * (tmproto.MAX_COOKIE - 500)) == NEED
    assert len(gate.buf) <= gate.max_start
    assert gate.feed(dis_uint(102)) == PASS
    assert tmproto.PbsGate(JOB).feed(packet(tmproto.PBS_TM + b"9" * 2000, length=10 ** 6)) == BAD


def test_torque_gate_checks_the_first_request_only():
    first = request(proto=tmproto.TORQUE_HEADER, rest=b"+1+1")
    g = tmproto.TorqueGate(JOB)
    assert [g.feed(first[:1]), g.feed(first[1:9]), g.feed(first[9:])] == [NEED, NEED, PASS]
    assert g.feed(b"+1+1anything") == PASS                  # later requests are not parsed (TORQUE: no framing)
    assert tmproto.gate_for("torque", JOB).__class__ is tmproto.TorqueGate
    assert tmproto.gate_for("pbs", JOB).__class__ is tmproto.PbsGate


@pytest.mark.parametrize("first", [b"+1+2", b"+3+2", b"+5+1", b"GET /",                # RM, IM, old TM, HTTP
                                   request(proto=b"+5+2", job="13.vm"),                 # another job's
                                   request(proto=b"+5+2", command=113),                 # TM_ADOPT_ALTID
                                   request(proto=b"+5+2", command=114),                 # TM_ADOPT_JOBID
                                   request(proto=b"+5+2", cookie=b"c" * 2000),
                                   packet(request())])                                  # OpenPBS's TM
def test_torque_gate_refuses_anything_but_a_tm_request_of_the_job(first):
    assert tmproto.TorqueGate(JOB).feed(first) == BAD


def _first_bytes_of(argv, env) -> bytes:
    """What the real client sends to $PBS_MOMPORT first (a listener here takes it, then closes)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    got = {}

    def take():
        conn, _ = lsock.accept()
        conn.settimeout(30)
        data = b""
        try:
            while len(data) < 64 * 1024:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) >= tmproto.PBS_HEAD and len(data) >= tmproto.PBS_HEAD + int.from_bytes(
                        data[7:11], "big") or data.startswith(b"+5+2") and len(data) > 40:
                    break
        finally:
            got["data"] = data
            conn.close()
    t = threading.Thread(target=take, daemon=True)
    t.start()
    env = dict(env, PBS_MOMPORT=str(lsock.getsockname()[1]))
    subprocess.run(argv, env=env, capture_output=True, timeout=60)
    t.join(30)
    lsock.close()
    return got.get("data", b"")


@pytest.mark.skipif(not os.access("/opt/pbs/bin/pbsdsh", os.X_OK), reason="OpenPBS not built here")
def test_real_openpbs_pbsdsh_request_passes_for_its_job_only():
    env = {"PATH": "/usr/bin:/bin", "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBID": JOB,
           "PBS_JOBCOOKIE": "39B9D2D7C1F64E2E9A2A1B0C3D4E9D12", "PBS_NODENUM": "0", "PBS_TASKNUM": "1"}
    wire = _first_bytes_of(["/opt/pbs/bin/pbsdsh", "--", "/bin/true"], env)
    assert wire.startswith(tmproto.PBS_MAGIC), wire[:40]
    assert tmproto.PbsGate(JOB).feed(wire) == PASS
    assert tmproto.PbsGate("13.vm").feed(wire) == BAD
    assert tmproto.TorqueGate(JOB).feed(wire) == BAD        # a TORQUE relay never passes PBS's TM


@pytest.mark.skipif(not os.access("/opt/torque/bin/pbsdsh", os.X_OK), reason="TORQUE not built here")
def test_real_torque_pbsdsh_request_passes_the_torque_gate_only():
    env = {"PATH": "/usr/bin:/bin", "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBID": "7.host",
           "PBS_JOBCOOKIE": "39B9D2D7C1F64E2E9A2A1B0C3D4E9D12", "PBS_NODENUM": "0", "PBS_TASKNUM": "1",
           "PBS_VNODENUM": "0"}
    wire = _first_bytes_of(["/opt/torque/bin/pbsdsh", "-u", "/bin/true"], env)
    if not wire:
        pytest.skip("this TORQUE pbsdsh sent nothing outside a job")
    assert tmproto.TorqueGate("7.host").feed(wire) == PASS
    assert tmproto.TorqueGate("8.host").feed(wire) == BAD
    assert tmproto.PbsGate("7.host").feed(wire) == BAD
