"""The image check cache (#13): served from memory only while armed and since the last event; the store that
races an event loses; negatives never kept. And the watcher's ordering, with a fake event stream."""

from __future__ import annotations

import threading
import time

import pytest

from cbatch.core.errors import EngineError
from cbatch.engines.imagecache import InfoCache
from cbatch.engines.imagewatch import SINCE_MARGIN, ImageWatch


class Fetch:
    """A fake engine answer per ref, counting the calls."""

    def __init__(self, answers):
        self.answers = dict(answers)
        self.calls = []

    def __call__(self, ref):
        self.calls.append(ref)
        return self.answers.get(ref)


def test_nothing_cached_before_armed():
    c, f = InfoCache(), Fetch({"a:1": "A"})
    assert c.lookup("a:1", f) == "A" and c.lookup("a:1", f) == "A"
    assert f.calls == ["a:1", "a:1"] and c.state()["entries"] == 0


def test_armed_answer_served_from_memory_by_reference_as_given():
    c, f = InfoCache(), Fetch({"a:1": "A", "docker.io/library/a:1": "A2"})
    c.arm()
    assert [c.lookup("a:1", f) for _ in range(3)] == ["A"] * 3
    assert c.lookup("docker.io/library/a:1", f) == "A2"      # another spelling is another key
    assert f.calls == ["a:1", "docker.io/library/a:1"]
    assert c.state()["hits"] == 2 and c.state()["fetches"] == 2


@pytest.mark.parametrize("change", ["invalidate", "disarm", "arm"])
def test_any_event_disarm_or_rearm_clears_everything(change):
    c, f = InfoCache(), Fetch({"a:1": "A", "b:1": "B"})
    c.arm()
    c.lookup("a:1", f), c.lookup("b:1", f)
    f.answers = {"a:1": "A-new", "b:1": "B-new"}
    getattr(c, change)()
    assert c.lookup("a:1", f) == "A-new" and c.lookup("b:1", f) == "B-new"


def test_disarmed_cache_keeps_nothing_until_armed_again():
    c, f = InfoCache(), Fetch({"a:1": "A"})
    c.arm()
    c.disarm()
    c.lookup("a:1", f), c.lookup("a:1", f)
    assert len(f.calls) == 2
    c.arm()
    c.lookup("a:1", f), c.lookup("a:1", f)
    assert len(f.calls) == 3


def test_negative_answer_never_cached():
    c, f = InfoCache(), Fetch({})
    c.arm()
    assert c.lookup("gone:1", f) is None and c.lookup("gone:1", f) is None
    assert f.calls == ["gone:1", "gone:1"]
    f.answers["gone:1"] = "PULLED"                 # pulled meanwhile: seen at once
    assert c.lookup("gone:1", f) == "PULLED"


def test_fetch_error_propagates_and_keeps_nothing():
    c = InfoCache()
    c.arm()

    def broken(ref):
        raise EngineError("engine", "not reachable", "unix:///x")
    with pytest.raises(EngineError):
        c.lookup("a:1", broken)
    assert c.state()["entries"] == 0


@pytest.mark.parametrize("between", ["invalidate", "disarm", "disarm+arm"])
def test_answer_fetched_then_event_then_store_is_dropped(between):
    """The race: the engine answered (old image), an event arrived, then the store: it must not be kept."""
    c = InfoCache()
    c.arm()
    calls = []

    def fetch(ref):
        calls.append(ref)
        if len(calls) == 1:            # the event lands while the first answer is on its way back
            for step in between.split("+"):
                getattr(c, step)()
            return "OLD"
        return "NEW"
    assert c.lookup("a:1", fetch) == "OLD"        # the caller gets what the engine said then
    assert c.lookup("a:1", fetch) == "NEW"        # but it was not kept
    assert c.lookup("a:1", fetch) == "NEW" and len(calls) == 2 + (between == "disarm")   # kept only while armed


def test_token_taken_before_arm_cannot_store():
    c = InfoCache()
    token = c.generation()
    assert token is None
    c.arm()
    assert c.store("a:1", "A", token) is False
    token = c.generation()
    c.invalidate()
    assert c.store("a:1", "A", token) is False
    token = c.generation()
    assert c.store("a:1", "A", token) is True


def test_bounded():
    c = InfoCache(max_entries=3)
    c.arm()
    for i in range(10):
        c.lookup(f"r:{i}", lambda ref: ref.upper())
    assert c.state()["entries"] == 3


# -- the watcher, with a fake engine whose event stream the test feeds ------------------------------------------
class FakeStream:
    """An event stream the test feeds: ``push(event)``, ``end()``; ``close()`` ends it as the SDK's does."""

    def __init__(self):
        self.items = []
        self.cond = threading.Condition()
        self.closed = False
        self._response = type("R", (), {"status_code": 200})()

    def push(self, ev):
        with self.cond:
            self.items.append(ev)
            self.cond.notify_all()

    def end(self):
        self.close()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def __iter__(self):
        return self

    def __next__(self):
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if self.items:
                return self.items.pop(0)
            raise StopIteration


class FakeApi:
    def __init__(self):
        self.streams = []
        self.fail = 0                      # refuse this many connects
        self.cond = threading.Condition()
        self.calls = []

    def events(self, since=None, filters=None, decode=None):
        with self.cond:
            self.calls.append((since, filters, decode))
            if self.fail:
                self.fail -= 1
                raise ConnectionError("engine down")
            s = FakeStream()
            self.streams.append(s)
            self.cond.notify_all()
            return s

    def wait_streams(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.streams) >= n, 10), self.streams
            return self.streams[n - 1]


def _wait(cond, what):
    ev = threading.Event()
    for _ in range(2000):
        if cond():
            return
        ev.wait(0.005)
    raise AssertionError(f"not reached: {what}")


def test_watcher_arms_after_subscription_clears_per_event_and_disarms_at_the_end():
    api = FakeApi()
    c = InfoCache()
    w = ImageWatch(type("D", (), {"api": api})(), c, min_delay=0.01, max_delay=0.02)
    w.start()
    try:
        s1 = api.wait_streams(1)
        _wait(lambda: c.state()["armed"], "armed")
        since, filters, decode = api.calls[0]
        # The replay window covers the moment between dockerd's headers and its subscription.
        assert filters == {"type": ["image"]} and decode is True and since <= time.time() - SINCE_MARGIN + 1
        c.lookup("a:1", lambda ref: "A")
        assert c.state()["entries"] == 1
        s1.push({"Type": "image", "Action": "tag"})
        _wait(lambda: c.state()["entries"] == 0 and w.events == 1, "event seen")
        c.lookup("a:1", lambda ref: "A")
        gen = c.state()["generation"]
        api.fail = 2
        s1.end()                                   # dockerd went away: disarmed, nothing served
        _wait(lambda: c.generation() is None or c.state()["generation"] > gen, "stream end seen")
        assert c.state()["entries"] == 0
        s2 = api.wait_streams(2)                   # back after two refused connects
        _wait(lambda: c.state()["armed"], "re-armed")
        assert len(api.calls) == 4 and w.connects == 2
        c.lookup("b:1", lambda ref: "B")
        s2.push({"Type": "image", "Action": "delete"})
        _wait(lambda: c.state()["entries"] == 0, "event on the new stream seen")
    finally:
        w.stop()
    assert c.state()["armed"] is False


def test_watcher_stop_closes_the_stream_and_disarms():
    api = FakeApi()
    c = InfoCache()
    w = ImageWatch(type("D", (), {"api": api})(), c, min_delay=0.01)
    w.start()
    s = api.wait_streams(1)
    _wait(lambda: c.state()["armed"], "armed")
    w.stop()
    assert s.closed and not c.state()["armed"] and not w._thread.is_alive()


class Witness:
    def __init__(self):
        self.value = ("ino", 1)

    def __call__(self):
        return self.value


def test_witness_change_without_event_is_a_miss():
    """A name change the engine did not announce (BuildKit on dockerd 20.10-23): the witness moved, so the
    kept answer is not served, and the new one is kept under the new stamp."""
    c, f, w = InfoCache(), Fetch({"a:1": "OLD"}), Witness()
    c.arm(w)
    assert c.lookup("a:1", f) == "OLD" and c.lookup("a:1", f) == "OLD" and len(f.calls) == 1
    f.answers["a:1"] = "NEW"
    w.value = ("ino", 2)
    assert c.lookup("a:1", f) == "NEW" and c.state()["unannounced"] == 1
    assert c.lookup("a:1", f) == "NEW" and len(f.calls) == 2


def test_witness_unreadable_keeps_nothing():
    c, f, w = InfoCache(), Fetch({"a:1": "A"}), Witness()
    c.arm(w)
    w.value = None
    c.lookup("a:1", f), c.lookup("a:1", f)
    assert len(f.calls) == 2 and c.state()["entries"] == 0
    w.value = ("ino", 3)
    c.lookup("a:1", f), c.lookup("a:1", f)
    assert len(f.calls) == 3


def test_witness_read_before_the_fetch():
    """The stamp kept is the one read before the engine was asked: a change during the fetch is a miss later."""
    c, w = InfoCache(), Witness()
    c.arm(w)

    def fetch(ref):
        w.value = ("ino", 9)         # the store moves while the engine answers (old answer)
        return "OLD"
    c.lookup("a:1", fetch)
    assert c.lookup("a:1", lambda ref: "NEW") == "NEW"
