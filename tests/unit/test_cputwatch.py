"""The cput watcher's decision, its line, its thread's life, and where it reads a container's CPU time."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from cbatch.daemon import cputwatch
from cbatch.daemon.supervise import Session, _with_line
from cbatch.host import cgroups

S = 1_000_000_000


@pytest.mark.parametrize("used,limit,over", [(None, 3, False), (0, 3, False), (3 * S, 3, False),
                                             (3 * S + 1, 3, True), (10 * S, 3, True), (1, 0, True)])
def test_exceeded_is_strictly_above(used, limit, over):
    assert cputwatch.exceeded(used, limit) is over


def test_message_is_one_line_in_the_house_format():
    line = cputwatch.message("12.node", 4_200_000_000, 3)
    assert line == ("cbatch: job 12.node: cput limit exceeded: 00:00:04.2 > 00:00:03 (CPU time of all the "
                    "container's processes; request more with qsub -l cput=HH:MM:SS)")
    assert cputwatch.hms(360000 + 61) == "100:01:01"
    assert cputwatch.hms_ns(3 * S + 1) == "00:00:03.1"        # never "3.0 > 3"
    assert cputwatch.hms_ns(59_950_000_000) == "00:01:00.0" and cputwatch.hms_ns(2 * S) == "00:00:02.0"


def test_watch_kills_once_at_the_first_reading_above_the_limit():
    readings = iter([None, 1 * S, 3 * S, 3 * S + 5, 9 * S])      # fake usage: one value per poll
    kills = []
    w = cputwatch.Watch("7.node", 3, lambda: next(readings), lambda: kills.append(1), poll=0)
    w.run()                                 # returns by itself: the limit was exceeded
    assert kills == [1]
    assert w.line.startswith("cbatch: job 7.node: cput limit exceeded: 00:00:03.1 > 00:00:03 (")
    assert next(readings) == 9 * S          # it stopped polling at the kill


def test_watch_under_the_limit_never_kills_and_is_joined_on_stop():
    polled = threading.Event()
    kills = []

    def usage():
        polled.set()
        return 2 * S
    w = cputwatch.Watch("8.node", 3, usage, lambda: kills.append(1), poll=0.001).start("cput-test")
    assert polled.wait(30)                  # the watcher really ran
    assert w.stop(30) is False and not w.thread.is_alive()
    assert kills == [] and w.line is None
    assert w.stop(30) is False              # idempotent


def test_watch_survives_a_failing_read():
    calls = []

    def usage():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("gone")
        return 5 * S
    kills = []
    cputwatch.Watch("9.node", 3, usage, lambda: kills.append(1), poll=0).run()
    assert len(calls) == 2 and kills == [1]


def _daemon(engine):
    return SimpleNamespace(engine=engine, config=SimpleNamespace(daemon=SimpleNamespace(stop_grace=2.0)))


def _sess(**kw):
    return Session(cid="c" * 64, job_id="1.node", batch="torque", kind="job", peer_pid=1, uid=1000, **kw)


def test_no_watcher_with_a_torque_cgroup_or_without_a_limit():
    d = _daemon(None)
    assert cputwatch.start(d, _sess(cput_limit=3, cgroup_parent="/torque/1.node")) is None
    assert cputwatch.start(d, _sess()) is None
    assert cputwatch.stop(d, None) is None


def test_started_watcher_reads_the_container_cgroup_and_stops_it(tmp_path, monkeypatch):
    usage = tmp_path / "cpuacct.usage"
    usage.write_text(f"{4 * S}\n")
    stopped = threading.Event()
    engine = SimpleNamespace(container_pid=lambda cid: 4242,
                             stop=lambda cid, grace: stopped.set())
    monkeypatch.setattr(cgroups, "cpu_usage_file", lambda pid, cid: str(usage) if pid == 4242 else None)
    d = _daemon(engine)
    w = cputwatch.start(d, _sess(cput_limit=3))
    assert stopped.wait(30)
    line = cputwatch.stop(d, w)
    assert "cput limit exceeded: 00:00:04.0 > 00:00:03" in line and not w.thread.is_alive()


def test_line_goes_first_in_the_exit_message():
    assert _with_line({"message": None}, "L")["message"] == "L"
    assert _with_line({"message": "oom"}, "L")["message"] == "L\noom"
    assert _with_line({"message": "oom"}, None)["message"] == "oom"


def test_record_keeps_the_limit_for_a_restarted_daemon():
    assert _sess(cput_limit=3).record()["cput_limit"] == 3


def _proc(tmp_path, text):
    (tmp_path / "proc" / "77").mkdir(parents=True)
    (tmp_path / "proc" / "77" / "cgroup").write_text(text)
    return str(tmp_path / "proc")


def test_cpu_usage_file_v1_docker_and_cgroup_parent(tmp_path):
    cid = "a" * 64
    root = tmp_path / "cg"
    f = root / "cpuacct" / "docker" / cid / "cpuacct.usage"
    f.parent.mkdir(parents=True)
    f.write_text("123456789\n")
    proc = _proc(tmp_path, f"4:memory:/docker/{cid}\n2:cpuacct:/docker/{cid}\n0::/docker/{cid}\n")
    path = cgroups.cpu_usage_file(77, cid, str(root), proc)
    assert path == str(f) and cgroups.read_cpu_ns(path) == 123456789
    assert cgroups.cpu_usage_file(77, "b" * 64, str(root), proc) is None      # a reused pid: another cgroup
    assert cgroups.cpu_usage_file(78, cid, str(root), proc) is None           # no such process


def test_cpu_usage_file_pure_v2_systemd_scope(tmp_path):
    cid = "d" * 64
    root = tmp_path / "cg"
    f = root / "system.slice" / f"docker-{cid}.scope" / "cpu.stat"
    f.parent.mkdir(parents=True)
    f.write_text("usage_usec 2500000\nuser_usec 2000000\n")
    proc = _proc(tmp_path, f"0::/system.slice/docker-{cid}.scope\n")
    path = cgroups.cpu_usage_file(77, cid, str(root), proc)
    assert path == str(f) and cgroups.read_cpu_ns(path) == 2_500_000_000


def test_cpu_usage_file_refuses_climbing_paths(tmp_path):
    cid = "e" * 64
    proc = _proc(tmp_path, f"2:cpuacct:/../../etc/{cid}\n")
    assert cgroups.cpu_usage_file(77, cid, str(tmp_path / "cg"), proc) is None
    assert cgroups.read_cpu_ns(str(tmp_path / "missing")) is None
