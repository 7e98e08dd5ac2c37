"""The engine's Docker API client keeps one connection for requests to different URLs (cbatch.engines.dockerapi):
the SDK made a pool, and so a connection, per URL, which every job's start and end paid for."""

from __future__ import annotations

import uuid

from cbatch.engines import dockerapi


def _count_connects(engine) -> list:
    adapter = engine.api.get_adapter("http+docker://localhost/")
    pool = adapter.get_connection("http+docker://localhost/v1.41/_ping")
    made = []
    new_conn = pool._new_conn

    def counted():
        made.append(1)
        return new_conn()
    pool._new_conn = counted
    return made


def test_requests_to_different_urls_share_one_connection(engine):
    made = _count_connects(engine)
    assert engine.list_ids({"cbatch.test": uuid.uuid4().hex}) == []
    assert engine.list_ids({"cbatch.test": uuid.uuid4().hex}) == []
    assert engine.image_info(f"cbatch-test/absent-{uuid.uuid4().hex[:8]}:1") is None
    assert engine.ping()
    assert len(made) == 1


def test_unix_socket_requests_ignore_proxy_environment(engine, monkeypatch):
    # A proxy variable must not reach a local socket (and reading the environment per request cost CPU).
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert engine.api.trust_env is False
    assert engine.ping()


def test_other_schemes_keep_the_sdks_client():
    api = dockerapi.client("tcp://127.0.0.1:2375", "1.41", 5, 16)
    assert not isinstance(getattr(api, "_custom_adapter", None), dockerapi._OnePoolAdapter)
    assert api.trust_env is True
