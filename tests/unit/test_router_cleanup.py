"""A job's cleanup asks Docker only when the job may have a Docker container (cbatch.engines.router): never
before a listing of the instance's Docker containers came back empty, always for a job with a start routed
to Docker, and again while Docker reports leftovers or could not be asked."""

from __future__ import annotations

import threading

import pytest

from cbatch.core.errors import EngineError
from cbatch.core.spec import LABEL_INSTANCE, LABEL_JOB, ContainerSpec
from cbatch.engines.base import Stdio
from cbatch.engines.router import Router

INST = "inst"


class FakeDocker:
    """Docker's containers as {id: labels}; counts the cleanups it was asked for."""

    def __init__(self) -> None:
        self.containers: dict = {}
        self.cleanups = 0
        self.down = False
        self.stuck: set = set()          # ids whose removal fails (left behind)
        self.gate = None                 # an Event start() waits on before it creates (a start in flight)
        self.entered = threading.Event()

    def list_ids(self, labels):
        if self.down:
            raise EngineError("engine", "not reachable", "unix:///x")
        return [c for c, l in self.containers.items() if all(l.get(k) == v for k, v in labels.items())]

    def cleanup(self, labels):
        self.cleanups += 1
        for cid in self.list_ids(labels):
            if cid not in self.stuck:
                del self.containers[cid]
        return self.list_ids(labels)

    def start(self, spec, stdio, instance, helper):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        cid = f"d{len(self.containers)}{spec.name}"
        self.containers[cid] = dict(spec.labels, **{LABEL_INSTANCE: instance})
        return cid


class FakeDirect:
    def list_ids(self, labels, unmatched=None):
        return []


def _spec(job: str, engine: str = "docker", labelled: bool = True) -> ContainerSpec:
    return ContainerSpec(name=f"cbatch-{job}", image="img", argv=("/bin/sh",), uid=1000, gid=1000, groups=(), workdir="/", env=(),
                         engine=engine,
                         labels=((LABEL_JOB, job),) if labelled else ())


def _labels(job: str) -> dict:
    return {LABEL_JOB: job, LABEL_INSTANCE: INST}


@pytest.fixture
def router():
    return Router(FakeDocker(), FakeDirect())


def test_before_an_empty_listing_every_cleanup_asks_docker(router):
    router.cleanup(_labels("1.vm"))
    assert router.docker.cleanups == 1


def test_a_direct_job_after_an_empty_listing_does_not_ask_docker(router):
    assert router.list_ids({LABEL_INSTANCE: INST}) == []
    router.cleanup(_labels("1.vm"))
    assert router.docker.cleanups == 0
    router.cleanup({LABEL_JOB: "1.vm", LABEL_INSTANCE: "other"})    # another instance: not known clean
    assert router.docker.cleanups == 1


def test_a_listing_with_docker_containers_keeps_asking(router):
    router.docker.containers["old"] = {LABEL_INSTANCE: INST, LABEL_JOB: "0.vm"}
    router.list_ids({LABEL_INSTANCE: INST})
    router.cleanup(_labels("1.vm"))
    assert router.docker.cleanups == 1


def test_a_job_started_on_docker_is_cleaned_up_on_docker(router):
    router.list_ids({LABEL_INSTANCE: INST})
    router.start(_spec("2.vm"), Stdio(), INST, "/h")
    assert router.cleanup(_labels("2.vm")) == []
    assert router.docker.cleanups == 1 and router.docker.containers == {}
    router.cleanup(_labels("2.vm"))          # cleaned: its entry went (bounded), Docker is not asked again
    assert router.docker.cleanups == 1


def test_leftovers_and_an_unreachable_docker_are_asked_about_again(router):
    router.list_ids({LABEL_INSTANCE: INST})
    cid = router.start(_spec("3.vm"), Stdio(), INST, "/h")
    router.docker.stuck.add(cid)
    assert router.cleanup(_labels("3.vm")) == [cid]
    assert router.cleanup(_labels("3.vm")) == [cid]
    assert router.docker.cleanups == 2
    router.docker.down = True
    with pytest.raises(EngineError):
        router.cleanup(_labels("3.vm"))
    router.docker.down = False
    router.docker.stuck.clear()
    assert router.cleanup(_labels("3.vm")) == []
    assert router.docker.cleanups == 4


def test_a_docker_start_in_flight_keeps_its_job_asked_about(router):
    # The cleanup runs while the start is inside the engine, before the container exists: it finds nothing,
    # and the container made afterwards must still be found by the next cleanup.
    router.list_ids({LABEL_INSTANCE: INST})
    router.docker.gate = threading.Event()
    t = threading.Thread(target=router.start, args=(_spec("4.vm"), Stdio(), INST, "/h"))
    t.start()
    try:
        assert router.docker.entered.wait(10)
        assert router.cleanup(_labels("4.vm")) == []
    finally:
        router.docker.gate.set()
        t.join()
    assert len(router.docker.containers) == 1
    assert router.cleanup(_labels("4.vm")) == []
    assert router.docker.cleanups == 2 and router.docker.containers == {}


def test_a_docker_start_without_a_job_label_makes_every_cleanup_ask(router):
    router.list_ids({LABEL_INSTANCE: INST})
    router.start(_spec("5.vm", labelled=False), Stdio(), INST, "/h")
    router.cleanup(_labels("6.vm"))
    assert router.docker.cleanups == 1


def test_direct_starts_do_not_mark_the_job(router):
    class Direct(FakeDirect):
        def unavailable(self, helper):
            return None

        def start(self, spec, stdio, instance, helper):
            return "direct-" + spec.name
    router.direct = Direct()
    router._driver = "overlay2"
    router.list_ids({LABEL_INSTANCE: INST})
    assert router.start(_spec("7.vm", engine="direct", ), Stdio(), INST, "/h").startswith("direct-")
    router.cleanup(_labels("7.vm"))
    assert router.docker.cleanups == 0


def test_direct_cleanup_lists_twice_with_one_memo_and_reports_leftovers(router):
    """The direct engine's list, remove, list again share one memo (each bundle's meta read once per
    cleanup, cbatch.engines.bundles.scan); what could not be removed is still reported."""
    class Direct(FakeDirect):
        def __init__(self):
            self.containers = {"direct-a": "8.vm", "direct-b": "8.vm", "direct-c": "0.vm"}
            self.memos = []

        def list_ids(self, labels, unmatched=None):
            self.memos.append(unmatched)
            return [c for c, job in self.containers.items() if job == labels[LABEL_JOB]]

        def remove(self, cid):
            if cid == "direct-b":
                raise EngineError("container", "remove failed", cid)
            del self.containers[cid]
    router.direct = Direct()
    assert router.cleanup(_labels("8.vm")) == ["direct-b"]
    assert len(router.direct.memos) == 2 and router.direct.memos[0] is router.direct.memos[1] is not None
    assert sorted(router.direct.containers) == ["direct-b", "direct-c"]
