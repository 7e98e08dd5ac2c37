"""ImageManager against a fake engine: pre-pull, backoff, ensure, pinning, inventory, prune, auth file."""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import pytest

from cbatch.daemon import regauth
from cbatch.core.config import parse
from cbatch.engines.docker import ImageInfo
from cbatch.core.errors import ConfigError, EngineError, JobError
from cbatch.core.imagerefs import created_epoch, pick_digest, progress_line, repo_of
from cbatch.daemon.imagesync import ImageManager

REG = "127.0.0.1:5999"
OLD = "2020-01-01T00:00:00.123456789Z"


def cfg(extra: str = "", prepull=(f"{REG}/cbt/busybox:1",), pull="never"):
    text = f"""
defaults:
  images: ["{REG}/cbt/*", "local/ok:*"]
  image: "{REG}/cbt/busybox:1"
  native: true
queues:
  batch:
    pull: {pull}
    prepull: {json.dumps(list(prepull))}
  other:
    images: ["other/img:1"]
    image: native
{extra}
"""
    return parse(text, path="/etc/cbatch/cbatch.yaml", hostname="node1")


class FakeEngine:
    """Local images by tag; ``registry`` maps ref -> ImageInfo that a pull yields; ``fail`` makes pulls fail."""

    def __init__(self):
        self.local = {}          # tag or digest ref -> ImageInfo
        self.registry = {}
        self.fail = None
        self.pulls = []
        self.removed = []
        self.in_use = set()
        self.lock = threading.Lock()

    def add(self, tag, iid, digests=(), size=1000, created=OLD, extra_tags=()):
        info = ImageInfo(id=iid, digests=tuple(digests), size=size, tags=(tag, *extra_tags) if tag else (),
                         created=created)
        for t in info.tags + info.digests:
            self.local[t] = info
        return info

    def image_info(self, ref):
        return self.local.get(ref)

    def pull(self, ref, auth_config=None, progress=None):
        with self.lock:
            self.pulls.append((ref, auth_config))
        if self.fail:
            raise EngineError("engine", "pull failed", ref, self.fail)
        info = self.registry.get(ref)
        if info is None:
            raise EngineError("image", "pull failed", ref, "manifest unknown")
        if progress:
            for ev in ({"status": "Pulling from cbt/busybox", "id": "1"}, {"status": "Pulling fs layer", "id": "ab"},
                       {"status": "Downloading", "id": "ab", "progress": "[==>  ]"},
                       {"status": "Pull complete", "id": "ab"}, {"status": "Digest: sha256:" + "d" * 64}):
                progress(ev)
        self.local[ref] = info
        return info

    def list_images(self):
        seen, out = set(), []
        for info in self.local.values():
            if info.id not in seen:
                seen.add(info.id)
                out.append(info)
        return out

    def remove_image(self, ref):
        self.removed.append(ref)
        return self.local.pop(ref, None) is not None

    def image_ids_in_use(self):
        return set(self.in_use)


def busybox_info(tag=f"{REG}/cbt/busybox:1"):
    return ImageInfo(id="sha256:" + "b" * 64, digests=(f"{REG}/cbt/busybox@sha256:" + "1" * 64,), size=2_000_000,
                     tags=(tag,), created=OLD)


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_helpers():
    assert repo_of(f"{REG}/cbt/busybox:1") == f"{REG}/cbt/busybox"
    assert repo_of("debian:12@sha256:" + "a" * 64) == "debian"
    assert repo_of("localhost:5000/x") == "localhost:5000/x"
    assert pick_digest(("a/x@sha256:1", "b/y@sha256:2"), "b/y:3") == "b/y@sha256:2"
    assert pick_digest((), "b/y:3") is None
    assert abs(created_epoch("2020-01-01T00:00:00.123456789Z") - 1577836800.123456) < 1e-3
    assert created_epoch("") is None and created_epoch("junk") is None
    assert progress_line("r", {"status": "Downloading", "id": "x"}) is None
    assert progress_line("r", {"status": "Pull complete", "id": "ab"}) == "cbatch: image: r: ab: Pull complete"


def test_prepull_thread_pulls_and_logs():
    eng = FakeEngine()
    eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
    lines = []
    m = ImageManager(eng, cfg(), lines.append, base_delay=0.05)
    m.start()
    try:
        assert wait_for(lambda: m.sync_status()[f"{REG}/cbt/busybox:1"]["state"] == "ok")
        st = m.sync_status()[f"{REG}/cbt/busybox:1"]
        assert st["digest"] == f"{REG}/cbt/busybox@sha256:" + "1" * 64 and st["size"] == 2_000_000
        assert any(l.startswith(f"cbatch: images: pulled {REG}/cbt/busybox:1 digest {REG}/cbt/busybox@sha256:")
                   and "2.0 MB" in l and l.endswith(" s") for l in lines)
        n = len(eng.pulls)
        status = m.sync(wait=5)              # an explicit sync pulls again
        assert len(eng.pulls) == n + 1 and status[f"{REG}/cbt/busybox:1"]["state"] == "ok"
    finally:
        m.stop()


def test_backoff_doubles_and_recovers():
    eng = FakeEngine()
    eng.fail = 'Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused'
    lines = []
    m = ImageManager(eng, cfg(), lines.append, base_delay=0.05, max_delay=0.2)
    m.start()
    try:
        assert wait_for(lambda: len(eng.pulls) >= 4, 5)
        fails = [l for l in lines if "pull failed" in l]
        assert "connection refused" in fails[0] and "attempt 1, retry in 0.05 s" in fails[0]
        assert "attempt 2, retry in 0.1 s" in fails[1]
        assert "attempt 3, retry in 0.2 s" in fails[2]
        assert wait_for(lambda: any("attempt 4, retry in 0.2 s" in l for l in lines))   # capped
        st = m.sync_status()[f"{REG}/cbt/busybox:1"]
        assert st["state"] == "failed" and "connection refused" in st["error"]
        eng.fail = None
        eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
        assert wait_for(lambda: m.sync_status()[f"{REG}/cbt/busybox:1"]["state"] == "ok", 5)
    finally:
        m.stop()


def test_sync_does_not_block_ensure():
    """A slow pre-pull must not hold up a job start on a present image."""
    eng = FakeEngine()
    eng.add(f"{REG}/cbt/debian:12", "sha256:" + "c" * 64)
    gate, inside, left = threading.Event(), threading.Event(), threading.Event()
    real_pull = eng.pull

    def slow_pull(ref, auth_config=None, progress=None):
        inside.set()
        try:
            gate.wait(60)           # a bound only: the test opens the gate
            return real_pull(ref, auth_config, progress)
        finally:
            left.set()

    eng.pull = slow_pull
    eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
    m = ImageManager(eng, cfg(), None)
    m.start()
    try:
        assert inside.wait(60), "the sync thread never started its pull"
        info = m.ensure(f"{REG}/cbt/debian:12", cfg().queue("batch"))
        assert info.id == "sha256:" + "c" * 64
        assert not left.is_set()    # answered while the sync thread was still inside its pull
    finally:
        gate.set()
        m.stop()


def test_ensure_missing_without_pull_lists_present():
    eng = FakeEngine()
    eng.add(f"{REG}/cbt/debian:12", "sha256:" + "c" * 64)
    eng.add("unrelated/secret:1", "sha256:" + "e" * 64)
    m = ImageManager(eng, cfg(), None)
    with pytest.raises(JobError) as ei:
        m.ensure(f"{REG}/cbt/busybox:2", cfg().queue("batch"))
    assert ei.value.message == (f"cbatch: image: not on this node: {REG}/cbt/busybox:2 (present here: "
                                f"{REG}/cbt/debian:12; ask the admin to pre-pull it)")
    assert eng.pulls == []


def test_ensure_pulls_with_progress_and_pins():
    eng = FakeEngine()
    eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
    m = ImageManager(eng, cfg(pull="missing"), None)
    lines = []
    info = m.ensure(f"{REG}/cbt/busybox:1", cfg(pull="missing").queue("batch"), lines.append)
    assert info.id == "sha256:" + "b" * 64
    assert "not on this node, pulling" in lines[0]
    assert f"cbatch: image: {REG}/cbt/busybox:1: ab: Pull complete" in lines
    assert not any("Downloading" in l for l in lines)
    assert lines[-1].startswith(f"cbatch: image: {REG}/cbt/busybox:1: pulled {REG}/cbt/busybox@sha256:")
    env = dict(m.job_env(f"{REG}/cbt/busybox:1", info))
    assert env["CBATCH_IMAGE_DIGEST"] == f"{REG}/cbt/busybox@sha256:" + "1" * 64
    assert env["CBATCH_IMAGE_ID"] == info.id
    pinned = f"{REG}/cbt/busybox:1@sha256:" + "1" * 64
    assert m.digest_of(pinned, info) == f"{REG}/cbt/busybox@sha256:" + "1" * 64


def test_ensure_failed_pull_is_one_line():
    eng = FakeEngine()
    eng.fail = "no basic auth credentials"
    m = ImageManager(eng, cfg(pull="missing"), None)
    with pytest.raises(EngineError) as ei:
        m.ensure(f"{REG}/cbt/busybox:1", cfg(pull="missing").queue("batch"), lambda l: None)
    assert ei.value.message == f"cbatch: image: pull failed: {REG}/cbt/busybox:1 (no basic auth credentials)"


def test_local_only_image_has_no_digest():
    eng = FakeEngine()
    info = eng.add("local/ok:1", "sha256:" + "f" * 64)
    m = ImageManager(eng, cfg(), None)
    assert m.digest_of("local/ok:1") is None
    assert dict(m.job_env("local/ok:1", info)) == {"CBATCH_IMAGE_ID": info.id}


def test_inventory():
    eng = FakeEngine()
    eng.add(f"{REG}/cbt/busybox:1", "sha256:" + "b" * 64, digests=(f"{REG}/cbt/busybox@sha256:" + "1" * 64,))
    eng.add("other/img:1", "sha256:" + "9" * 64)
    m = ImageManager(eng, cfg(prepull=(f"{REG}/cbt/busybox:1", f"{REG}/cbt/debian:12")), None)
    inv = m.inventory()
    assert json.loads(json.dumps(inv)) == inv
    q = {x["name"]: x for x in inv["queues"]}
    assert [p["ref"] for p in q["batch"]["present"]] == [f"{REG}/cbt/busybox:1"]
    assert q["batch"]["present"][0]["digest"] == f"{REG}/cbt/busybox@sha256:" + "1" * 64
    assert q["batch"]["missing"] == [f"{REG}/cbt/debian:12"]
    assert q["batch"]["default"] == f"{REG}/cbt/busybox:1" and q["batch"]["pull"] == "never"
    assert [p["ref"] for p in q["other"]["present"]] == ["other/img:1"]


def test_prune_only_unallowed_unused_old():
    eng = FakeEngine()
    eng.add(f"{REG}/cbt/busybox:1", "sha256:" + "b" * 64)               # allowed
    eng.add("junk/a:1", "sha256:" + "1" * 64)                              # goes
    eng.add("junk/b:1", "sha256:" + "2" * 64)                              # in use: stays
    eng.add("junk/c:1", "sha256:" + "3" * 64, created="2099-01-01T00:00:00Z")   # too young with max age
    eng.add("other/img:1", "sha256:" + "4" * 64)                           # allowed in queue other
    eng.add(None, "sha256:" + "5" * 64, digests=("junk/d@sha256:" + "5" * 64,))  # digest-only pull: goes
    eng.in_use = {"sha256:" + "2" * 64}
    m = ImageManager(eng, cfg(extra="images: {prune_max_age_days: 30}"), None)
    assert sorted(m.prune(dry_run=True)) == ["junk/a:1", "junk/d@sha256:" + "5" * 64]
    assert eng.removed == []
    assert m.prune(scope="junk/a:*") == ["junk/a:1"]
    assert eng.removed == ["junk/a:1"]
    m2 = ImageManager(eng, cfg(), None)                 # no max age: the young one goes too
    assert sorted(m2.prune()) == ["junk/c:1", "junk/d@sha256:" + "5" * 64]


def _auth_file(tmp_path, content, mode=0o600):
    p = tmp_path / "auth.json"
    p.write_text(json.dumps(content))
    os.chmod(p, mode)
    return str(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned auth file needs uid 0")
def test_auth_file(tmp_path):
    tok = base64.b64encode(b"alice:s3cr:et").decode()
    path = _auth_file(tmp_path, {"auths": {f"http://{REG}/v2/": {"auth": tok}, "other:1": {"username": "u",
                                                                                          "password": "p"}}})
    assert regauth.auth_for(path, f"{REG}/cbt/busybox:1") == {"username": "alice", "password": "s3cr:et",
                                                               "serveraddress": REG}
    assert regauth.auth_for(path, "debian:12") is None
    assert regauth.auth_for(None, f"{REG}/x") is None
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as ei:
        regauth.auth_for(path, f"{REG}/x")
    assert "mode 0644" in ei.value.message and "s3cr" not in ei.value.message
    os.chmod(path, 0o600)
    os.chown(path, 65534, 0)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        regauth.auth_for(path, f"{REG}/x")
    os.chown(path, 0, 0)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="cannot read"):
        regauth.auth_for(str(link), f"{REG}/x")
    bad = _auth_file(tmp_path, {"auths": {REG: {"auth": "!!!"}}})
    with pytest.raises(ConfigError, match="not base64"):
        regauth.auth_for(bad, f"{REG}/x")


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned auth file needs uid 0")
def test_pull_gets_credentials_and_unsafe_file_refused(tmp_path):
    tok = base64.b64encode(b"alice:pw").decode()
    path = _auth_file(tmp_path, {"auths": {REG: {"auth": tok}}})
    eng = FakeEngine()
    eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
    m = ImageManager(eng, cfg(extra=f"registry: {{auth_file: {path}}}", pull="missing"), None)
    m.ensure(f"{REG}/cbt/busybox:1", m.config.queue("batch"))
    assert eng.pulls[-1][1]["username"] == "alice"
    os.chmod(path, 0o640)
    del eng.local[f"{REG}/cbt/busybox:1"]
    with pytest.raises(ConfigError, match="registry auth file refused"):
        m.ensure(f"{REG}/cbt/busybox:1", m.config.queue("batch"))


def test_regauth_registry_of():
    assert regauth.registry_of("debian:12") == "docker.io"
    assert regauth.registry_of("library/debian") == "docker.io"
    assert regauth.registry_of("localhost/x") == "localhost"
    assert regauth.registry_of(f"{REG}/a/b@sha256:" + "a" * 64) == REG


def test_handle_request_and_cli_formatting():
    from cbatch.core.errors import AccessDenied, DaemonError
    from cbatch.admin.images import format_inventory, format_sync
    from cbatch.daemon.imagesync import handle_request

    eng = FakeEngine()
    eng.add(f"{REG}/cbt/busybox:1", "sha256:" + "b" * 64, digests=(f"{REG}/cbt/busybox@sha256:" + "1" * 64,))
    eng.add("junk/a:1", "sha256:" + "1" * 64)
    eng.registry[f"{REG}/cbt/busybox:1"] = busybox_info()
    m = ImageManager(eng, cfg(), None)
    inv = handle_request(m, {"v": 1, "op": "images"}, 1000)["inventory"]
    text = format_inventory(inv)
    assert f"queue batch: default {REG}/cbt/busybox:1, pull never" in text
    assert "sha256:111111111111" in text and "  allowed: 127.0.0.1:5999/cbt/*, local/ok:*" in text
    lines = text.splitlines()
    at = next(i for i, l in enumerate(lines) if l.split()[:1] == ["IMAGE"])
    header, row = lines[at].split(), lines[at + 1].split()
    assert header == ["IMAGE", "DIGEST", "ID", "SIZE"]
    assert row[1] == "sha256:111111111111" and row[2] == "sha256:bbbbbbbbbbbb"     # repo digest, image id
    for action in ("sync", "prune"):
        with pytest.raises(AccessDenied, match=f"cbatch: images: {action} needs root: uid 1000"):
            handle_request(m, {"action": action}, 1000)
    with pytest.raises(DaemonError, match="bad field: action"):
        handle_request(m, {"action": "nuke"}, 0)
    assert handle_request(m, {"action": "prune", "dry_run": True}, 0) == {"removed": ["junk/a:1"], "dry_run": True}
    assert eng.removed == []
    m.start()
    try:
        status = handle_request(m, {"action": "sync"}, 0)["sync"]
    finally:
        m.stop()
    assert status[f"{REG}/cbt/busybox:1"]["state"] == "ok"
    assert format_sync(status).startswith(f"{REG}/cbt/busybox:1: ok {REG}/cbt/busybox@sha256:")
    failed = {"x:1": {"state": "failed", "error": "connection refused", "retry_in": 5.0, "attempts": 2}}
    assert format_sync(failed) == "x:1: FAILED (connection refused); retry in 5.0 s\n"
    assert "x:1 [failed x2, retry in 5.0 s: connection refused]" in format_inventory(
        {"queues": [{"name": "q", "default": "native", "pull": "never", "allowed": [], "prepull": ["x:1"],
                     "present": [], "missing": ["x:1"]}], "sync": failed})


def test_prune_keeps_prepull_and_default_in_any_spelling():
    from cbatch.daemon.imagesync import ref_key
    d = "sha256:" + "7" * 64
    assert ref_key("debian:12") == ref_key("docker.io/library/debian:12")
    assert ref_key(f"reg.example/x:1@{d}") == ref_key(f"reg.example/x@{d}")
    eng = FakeEngine()
    eng.add(None, "sha256:" + "6" * 64, digests=(f"pinned.example/tool@{d}",))   # pulled by digest only
    eng.add("docker.io/library/debian:12", "sha256:" + "8" * 64)
    eng.add("junk/z:1", "sha256:" + "9" * 64)
    extra = f"""
  pinned:
    images: ["other/img:1"]
    image: native
    prepull: ["pinned.example/tool:3@{d}", "debian:12"]
"""
    m = ImageManager(eng, cfg(extra=extra), None)
    assert m.prune(dry_run=True) == ["junk/z:1"]


class CountingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.infos = []

    def image_info(self, ref):
        self.infos.append(ref)
        return super().image_info(ref)


def test_job_start_checks_served_by_the_armed_cache_and_cleared_by_cbatchs_own_changes():
    """#13: with the daemon's cache armed, a second start's check is no engine call; a pull or a prune
    removal done by cbatch itself clears it (the next check asks the engine)."""
    from cbatch.engines.imagecache import InfoCache
    ref = f"{REG}/cbt/busybox:1"
    eng, cache = CountingEngine(), InfoCache()
    cache.arm()
    eng.add(ref, "sha256:" + "b" * 64)
    eng.add("old/img:1", "sha256:" + "c" * 64)
    eng.registry[ref] = busybox_info()
    m = ImageManager(eng, cfg(pull="missing"), None, cache=cache)
    pol = cfg(pull="missing").queue("batch")
    first = m.ensure(ref, pol)
    assert m.ensure(ref, pol) is first and eng.infos == [ref]
    m._pull_one(ref)                                 # the sync thread's pull
    m.ensure(ref, pol)
    assert eng.infos == [ref, ref]
    assert m.prune() == ["old/img:1"]               # a removal
    m.ensure(ref, pol)
    assert eng.infos == [ref, ref, ref]
    del eng.local[ref]                               # removed behind cbatch's back: the engine's event
    cache.invalidate()
    assert m._have(ref) is False and m._have(ref) is False   # a negative answer is never kept
    m.ensure(ref, pol, lambda line: None)
    m.ensure(ref, pol)
    assert eng.infos == [ref] * 7 and eng.pulls[-1][0] == ref
