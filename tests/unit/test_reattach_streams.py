"""Which streams a restarted daemon proxies again for a session it takes back (cbatch.daemon.launch._proxy_again):
the ones the old daemon's record says it proxied, between the reattached client's own descriptors and a new
attach stream; a terminal gets its input back, other stdin does not."""

from __future__ import annotations

import os

import pytest

from cbatch.core.errors import EngineError
from cbatch.daemon.launch import _proxy_again

NONE = (None, None, None)


class Engine:
    def __init__(self, proxied=True, fails=False):
        self._proxied, self.fails, self.calls = proxied, fails, []

    def proxied(self, cid):
        return self._proxied

    def reattach(self, cid, stdin):
        self.calls.append((cid, stdin))
        if self.fails:
            raise EngineError("container", "attach failed", cid)


class Daemon:
    def __init__(self, engine):
        self.engine = engine


@pytest.fixture
def fds():
    master, slave = os.openpty()
    r, w = os.pipe()
    yield (slave, w, w)
    for fd in (master, slave, r, w):
        os.close(fd)


def test_a_terminal_is_proxied_again_with_its_input(fds):
    engine = Engine()
    assert _proxy_again(Daemon(engine), "c1", "1.vm", {"tty": True, "pump": [False] * 3}, fds) == (fds[0], NONE)
    assert engine.calls == [("c1", True)]


def test_pipes_are_proxied_again_without_stdin(fds):
    engine = Engine()
    record = {"tty": False, "pump": [True, True, False]}
    assert _proxy_again(Daemon(engine), "c1", "1.vm", record, fds) == (None, (None, fds[1], None))
    assert engine.calls == [("c1", False)]


@pytest.mark.parametrize("record", [{}, {"tty": False, "pump": [False, False, False]}, {"pump": None}],
                         ids=["older daemon", "nothing proxied", "null"])
def test_nothing_recorded_nothing_proxied(fds, record):
    engine = Engine()
    assert _proxy_again(Daemon(engine), "c1", "1.vm", record, fds) == (None, NONE)
    assert engine.calls == []


def test_an_engine_that_hands_over_descriptors_is_not_asked(fds):
    engine = Engine(proxied=False)
    assert _proxy_again(Daemon(engine), "c1", "1.vm", {"tty": True, "pump": [True] * 3}, fds) == (None, NONE)
    assert engine.calls == []


def test_a_terminal_session_whose_client_brings_no_terminal_is_not_proxied(fds, caplog):
    engine = Engine()
    pipe_fds = (fds[1], fds[1], fds[1])
    assert _proxy_again(Daemon(engine), "c1", "1.vm", {"tty": True}, pipe_fds) == (None, NONE)
    assert engine.calls == []
    assert "no terminal" in caplog.text


def test_a_failed_attach_leaves_the_session_unproxied_and_says_so(fds, caplog):
    engine = Engine(fails=True)
    assert _proxy_again(Daemon(engine), "c1", "1.vm", {"pump": [False, True, True]}, fds) == (None, NONE)
    assert engine.calls == [("c1", False)]
    assert "cannot be proxied again" in caplog.text


def test_a_client_without_its_three_descriptors_gets_nothing(fds):
    engine = Engine()
    assert _proxy_again(Daemon(engine), "c1", "1.vm", {"pump": [False, True, True]}, fds[:2]) == (None, NONE)
    assert engine.calls == []
