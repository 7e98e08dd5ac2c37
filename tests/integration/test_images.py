"""Issue 5 against the real engine and a real loopback registry (scripts/registry-up).

Everything this module creates in the shared Docker engine is named under ``127.0.0.1:<its own port>/``
(a registry started for this run on a free port), and prune is always called with ``scope`` set to that
prefix, so a test run can never untag or remove an image another test or engineer uses.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from cbatch.core.config import image_allowed, parse
from cbatch.core.errors import ConfigError, EngineError, JobError
from cbatch.daemon.imagesync import ImageManager

pytestmark = [pytest.mark.registry, pytest.mark.root, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "cbt-puller", "pw-" + uuid.uuid4().hex[:12]


def docker(*args, input=None, check=True):
    return subprocess.run(["docker", *args], input=input, capture_output=True, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self):
        self.name = f"cbt{os.getpid()}"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.digests = {}

    def up(self, auth: bool = False):
        argv = [str(ROOT / "scripts" / "registry-up"), "--name", self.name, "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k != "CBATCH_REGISTRY_AUTH"}
        if auth:
            env["CBATCH_REGISTRY_AUTH"] = f"{USER}:{PASSWORD}"     # not in argv: keeps it out of ps
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
        assert f"on {self.host}" in out

    def down(self, purge: bool = False):
        argv = [str(ROOT / "scripts" / "registry-down"), "--name", self.name] + (["--purge"] if purge else [])
        subprocess.run(argv, capture_output=True, check=True)

    def ref(self, path: str) -> str:
        return f"{self.host}/{path}"

    def push(self, local: str, path: str) -> str:
        """Tag ``local`` as ours, push it, drop our local tag; return the pushed repo digest."""
        ref = self.ref(path)
        docker("tag", local, ref)
        out = docker("push", ref).stdout.decode()
        docker("rmi", ref)
        digest = re.search(r"digest: (sha256:[0-9a-f]{64})", out).group(1)
        self.digests[path] = digest
        return digest

    def untag_all(self):
        """Remove every local reference under our registry prefix (tags and digests): only ours."""
        out = docker("images", "--digests", "--format", "{{.Repository}} {{.Tag}} {{.Digest}}").stdout.decode()
        for line in out.splitlines():
            repo, tag, digest = line.split(" ")
            if not repo.startswith(self.host + "/"):
                continue
            if tag != "<none>":
                docker("rmi", f"{repo}:{tag}", check=False)
            if digest != "<none>":
                docker("rmi", f"{repo}@{digest}", check=False)


@pytest.fixture(scope="module")
def registry(test_images):
    reg = Registry()
    reg.up()
    try:
        reg.push(test_images["busybox"], "cbt/busybox:1")
        reg.push(test_images["debian"], "cbt/debian:12")
        yield reg
    finally:
        reg.untag_all()
        reg.down(purge=True)


@pytest.fixture
def clean(registry):
    """Each test starts with none of the registry's images present locally."""
    registry.untag_all()
    yield registry
    registry.untag_all()


def site(reg: Registry, *, pull="never", prepull=(), extra=""):
    text = f"""
defaults:
  images: ["{reg.host}/cbt/*"]
  image: native
queues:
  batch:
    pull: {pull}
    prepull: {json.dumps(list(prepull))}
{extra}
"""
    return parse(text, path="/etc/cbatch/cbatch.yaml", hostname="node1")


def wait_for(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_prepull_at_start_lists_digests(clean, engine):
    reg = clean
    refs = [reg.ref("cbt/busybox:1"), reg.ref("cbt/debian:12")]
    assert all(engine.image_info(r) is None for r in refs)
    lines = []
    m = ImageManager(engine, site(reg, prepull=refs), lines.append, base_delay=0.2)
    m.start()
    try:
        assert wait_for(lambda: all(s["state"] == "ok" for s in m.sync_status().values()), 120), lines
    finally:
        m.stop()
    for path in ("cbt/busybox:1", "cbt/debian:12"):
        pulled = [l for l in lines if l.startswith(f"cbatch: images: pulled {reg.ref(path)} ")]
        assert pulled and f"digest {reg.host}/{path.split(':')[0]}@{reg.digests[path]}" in pulled[0]
        assert re.search(r"size \d+\.\d MB in \d+\.\d s$", pulled[0])
    batch = {q["name"]: q for q in m.inventory()["queues"]}["batch"]
    present = {p["ref"]: p for p in batch["present"]}
    assert set(present) == set(refs) and batch["missing"] == []
    assert present[refs[0]]["digest"] == f"{reg.host}/cbt/busybox@{reg.digests['cbt/busybox:1']}"
    assert present[refs[1]]["size"] > 0


class CountedPulls:
    """The real engine, every ``pull`` recorded; while ``hold`` is set a pull waits at its start for it to
    be cleared (``inside``/``left`` show where the pulling thread is)."""

    def __init__(self, engine):
        self._engine, self.calls = engine, []
        self.hold, self.inside, self.left = None, threading.Event(), threading.Event()

    def pull(self, ref, *args, **kw):
        self.calls.append(ref)
        gate = self.hold
        if gate is not None:
            self.inside.set()
            gate.wait(60)           # a bound only: the test opens the gate
        try:
            return self._engine.pull(ref, *args, **kw)
        finally:
            if gate is not None:
                self.left.set()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_missing_image_without_pulls_fails_at_once(clean, engine):
    reg = clean
    docker("tag", "cbatch-test/busybox:1", reg.ref("cbt/busybox:1"))
    pulls = CountedPulls(engine)
    m = ImageManager(pulls, site(reg), None)
    with pytest.raises(JobError) as ei:
        m.ensure(reg.ref("cbt/debian:12"), m.config.queue("batch"))
    assert pulls.calls == []            # at once: refused without trying to pull
    assert ei.value.message == (f"cbatch: image: not on this node: {reg.ref('cbt/debian:12')} "
                                f"(present here: {reg.ref('cbt/busybox:1')}; ask the admin to pre-pull it)")
    assert engine.image_info(reg.ref("cbt/debian:12")) is None


def test_missing_image_with_pulls_on_is_pulled_with_progress(clean, engine):
    reg = clean
    m = ImageManager(engine, site(reg, pull="missing"), None)
    lines = []
    info = m.ensure(reg.ref("cbt/busybox:1"), m.config.queue("batch"), lines.append)
    assert engine.image_info(reg.ref("cbt/busybox:1")).id == info.id
    assert "not on this node, pulling" in lines[0]
    assert any(l.startswith(f"cbatch: image: {reg.ref('cbt/busybox:1')}: Digest: ") for l in lines), lines
    assert lines[-1].startswith(f"cbatch: image: {reg.ref('cbt/busybox:1')}: pulled {reg.host}/cbt/busybox@sha256:")
    env = dict(m.job_env(reg.ref("cbt/busybox:1"), info))
    assert env["CBATCH_IMAGE_DIGEST"] == f"{reg.host}/cbt/busybox@{reg.digests['cbt/busybox:1']}"
    with pytest.raises(EngineError) as ei:                      # not in the registry: one clear line
        m.ensure(reg.ref("cbt/nosuch:1"), m.config.queue("batch"), lines.append)
    assert ei.value.message.startswith(f"cbatch: image: pull failed: {reg.ref('cbt/nosuch:1')} (")
    assert "\n" not in ei.value.message


def test_pinned_digest_resolves(clean, engine):
    reg = clean
    m = ImageManager(engine, site(reg, pull="missing"), None)
    info = m.ensure(reg.ref("cbt/busybox:1"), m.config.queue("batch"))
    pinned = m.digest_of(reg.ref("cbt/busybox:1"))
    assert pinned == f"{reg.host}/cbt/busybox@{reg.digests['cbt/busybox:1']}"
    assert image_allowed(pinned, m.config.queue("batch").images)     # the policy takes --image=name@sha256:
    assert m.ensure(pinned, m.config.queue("batch")).id == info.id   # present: used at once
    reg.untag_all()                                                  # gone: pulled by digest
    assert m.ensure(pinned, m.config.queue("batch"), lambda l: None).id == info.id
    assert m.digest_of(pinned) == pinned


def test_registry_down_backoff_and_present_images_unaffected(clean, engine):
    reg = clean
    docker("tag", "cbatch-test/busybox:1", reg.ref("cbt/busybox:1"))
    lines = []
    reg.down()
    try:
        pulls = CountedPulls(engine)
        m = ImageManager(pulls, site(reg, prepull=[reg.ref("cbt/debian:12")]), lines.append,
                         base_delay=0.3, max_delay=1.2)
        m.start()
        try:
            assert wait_for(lambda: sum("pull failed" in l for l in lines) >= 3, 30), lines
            fails = [l for l in lines if "pull failed" in l]
            assert f"pull failed: {reg.ref('cbt/debian:12')}: " in fails[0]
            assert "connection refused" in fails[0]
            assert "attempt 1, retry in 0.3 s" in fails[0] and "attempt 2, retry in 0.6 s" in fails[1]
            assert "attempt 3, retry in 1.2 s" in fails[2]
            # A job start is not held up: answered while the sync thread is inside its next pull.
            pulls.hold = threading.Event()
            assert pulls.inside.wait(60), "the sync thread never retried"
            assert m.ensure(reg.ref("cbt/busybox:1"), m.config.queue("batch")).id
            assert not pulls.left.is_set()
            gate, pulls.hold = pulls.hold, None
            gate.set()
            assert m.sync_status()[reg.ref("cbt/debian:12")]["state"] == "failed"
            reg.up()
            assert wait_for(lambda: m.sync_status()[reg.ref("cbt/debian:12")]["state"] == "ok", 60), lines
        finally:
            m.stop()
    finally:
        reg.up()


def _auth_file(tmp_path, host, mode=0o600) -> str:
    p = tmp_path / "registry-auth.json"
    tok = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    p.write_text(json.dumps({"auths": {host: {"auth": tok}}}))
    os.chown(p, 0, 0)
    os.chmod(p, mode)
    return str(p)


def test_registry_with_credentials(clean, engine, tmp_path):
    reg = clean
    reg.up(auth=True)
    try:
        plain = ImageManager(engine, site(reg, pull="missing"), None)
        with pytest.raises(EngineError) as ei:
            plain.ensure(reg.ref("cbt/busybox:1"), plain.config.queue("batch"), lambda l: None)
        msg = ei.value.message
        assert msg.startswith(f"cbatch: image: pull failed: {reg.ref('cbt/busybox:1')} (") and "\n" not in msg
        assert "auth" in msg.lower() or "unauthorized" in msg.lower()
        path = _auth_file(tmp_path, reg.host)
        authed = ImageManager(engine, site(reg, pull="missing", extra=f"registry: {{auth_file: {path}}}"), None)
        info = authed.ensure(reg.ref("cbt/busybox:1"), authed.config.queue("batch"), lambda l: None)
        assert info.id and PASSWORD not in json.dumps(authed.inventory())
        reg.untag_all()
        os.chmod(path, 0o644)                                            # readable by all: refused
        with pytest.raises(ConfigError) as ei:
            authed.ensure(reg.ref("cbt/busybox:1"), authed.config.queue("batch"), lambda l: None)
        assert "registry auth file refused: mode 0644" in ei.value.message and PASSWORD not in ei.value.message
    finally:
        reg.up()


def _unique_image(tag: str) -> str:
    """A tiny image of our own (unique id: nobody else can be using it); returns its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = uuid.uuid4().hex.encode()
        ti = tarfile.TarInfo("marker")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    out = docker("import", "--change", f"LABEL cbatch.test.prune={uuid.uuid4().hex}", "-", tag, input=buf.getvalue())
    return out.stdout.decode().strip()


def test_prune_removes_only_unallowed_unused(clean, engine, unique_instance):
    reg = clean
    kept = reg.ref("cbt/busybox:1")
    docker("tag", "cbatch-test/busybox:1", kept)
    extra, used = reg.ref("junk/extra:1"), reg.ref("junk/used:1")
    _unique_image(extra)
    _unique_image(used)
    cid = docker("create", "--label", f"cbatch.instance={unique_instance}", used, "/marker").stdout.decode().strip()
    scope = reg.host + "/*"          # never look at anything outside our own registry prefix
    try:
        young = ImageManager(engine, site(reg, extra="images: {prune_max_age_days: 1}"), None)
        assert young.prune(scope=scope) == []                          # just created: too young
        m = ImageManager(engine, site(reg), None)
        assert m.prune(dry_run=True, scope=scope) == [extra]
        assert engine.image_info(extra) is not None
        assert m.prune(scope=scope) == [extra]
        assert engine.image_info(extra) is None
        assert engine.image_info(kept) is not None                     # allowed by the queue
        assert engine.image_info(used) is not None                     # a container uses it
        assert engine.image_info("cbatch-test/busybox:1") is not None
    finally:
        docker("rm", "-f", cid, check=False)
        docker("rmi", used, check=False)
        docker("rmi", extra, check=False)


# -- through cbatchd: the `images` op, pre-pull at start, job-start checks into the job's .e file -----------

@pytest.fixture(scope="module")
def reg_daemon(registry, daemon_factory):
    reg = registry
    reg.untag_all()
    queues = {
        "reg": {"images": [f"{reg.host}/cbt/*"], "image": reg.ref("cbt/busybox:1"),
                "prepull": [reg.ref("cbt/busybox:1")]},
        "regpull": {"images": [f"{reg.host}/cbt/*"], "image": reg.ref("cbt/busybox:1"), "pull": "missing"},
        # only the exact tag: its digest (issue 10.15) is allowed as that tag's image, nothing else is
        "exacttag": {"images": [reg.ref("cbt/busybox:1")], "image": "native"},
    }
    return daemon_factory("images", queues=queues)


def _images(d, **fields):
    from cbatch.clients import client
    return client.call(d.socket, "images", **fields)


def test_daemon_prepulls_and_lists(reg_daemon, registry):
    reg = registry
    ref = reg.ref("cbt/busybox:1")
    assert wait_for(lambda: (_images(reg_daemon, action="list")["inventory"]["sync"].get(ref) or {})
                    .get("state") == "ok", 120), reg_daemon.log()
    inv = _images(reg_daemon, action="list")["inventory"]
    q = {x["name"]: x for x in inv["queues"]}["reg"]
    assert [p["digest"] for p in q["present"] if p["ref"] == ref] == [
        f"{reg.host}/cbt/busybox@{reg.digests['cbt/busybox:1']}"]
    assert f"pulled {ref} digest" in reg_daemon.log()
    p = subprocess.run([sys.executable, "-m", "cbatch.cli", "images", "list", "--socket", reg_daemon.socket],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "queue reg: default " + ref in p.stdout and f"{ref} [ok]" in p.stdout
    assert reg.digests["cbt/busybox:1"][:19] in p.stdout


def test_daemon_sync_and_prune_need_root(reg_daemon, registry, alice):
    code = ("import sys; from cbatch.clients import client; from cbatch.core.errors import CbatchError\n"
            "try:\n client.call(sys.argv[1], 'images', action=sys.argv[2])\n"
            "except CbatchError as e:\n print(e.message); sys.exit(e.exit_code)\n")
    for action in ("sync", "prune"):
        p = subprocess.run(["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--clear-groups",
                            sys.executable, "-c", code, reg_daemon.socket, action], capture_output=True, text=True)
        assert p.returncode != 0 and f"cbatch: images: {action} needs root: uid {alice.uid}" in p.stdout, p
    p = subprocess.run(["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--clear-groups",
                        sys.executable, "-c", code, reg_daemon.socket, "list"], capture_output=True, text=True)
    assert p.returncode == 0, p
    status = _images(reg_daemon, action="sync")["sync"]                    # root: allowed, waits
    assert status[registry.ref("cbt/busybox:1")]["state"] == "ok"


def test_job_missing_image_fails_with_message(reg_daemon, registry, mom_factory, alice):
    from torque_helpers import script
    reg = registry
    docker("rmi", reg.ref("cbt/debian:12"), check=False)
    mom = mom_factory(reg_daemon)
    r = mom.submit(script("echo ran", image=reg.ref("cbt/debian:12"), shebang="#!/bin/sh"), alice.name,
                   queue="reg").wait(60)
    assert r.exit_status == 125 and r.stdout == b""
    assert f"cbatch: image: not on this node: {reg.ref('cbt/debian:12')} (present here: ".encode() in r.stderr


def test_job_pulls_missing_image_and_sees_digest(reg_daemon, registry, mom_factory, alice):
    from torque_helpers import script
    reg = registry
    docker("rmi", reg.ref("cbt/debian:12"), check=False)
    mom = mom_factory(reg_daemon)
    r = mom.submit(script('echo "digest=$CBATCH_IMAGE_DIGEST"', image=reg.ref("cbt/debian:12")), alice.name,
                   queue="regpull").wait(180)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().strip() == f"digest={reg.host}/cbt/debian@{reg.digests['cbt/debian:12']}"
    err = r.stderr.decode()
    assert f"cbatch: image: {reg.ref('cbt/debian:12')}: not on this node, pulling" in err
    assert f"cbatch: image: {reg.ref('cbt/debian:12')}: pulled {reg.host}/cbt/debian@" in err


def test_daemon_allows_the_digest_of_an_allowed_tag(reg_daemon, registry, mom_factory, carol):
    """``--image=name@sha256:..`` in a queue allowing only ``name:1``: runs when that digest is tag 1's
    image here (the old policy refused it: no pattern matches a digest reference); another digest of the
    same repository is refused in one line."""
    reg = registry
    ref = reg.ref("cbt/busybox:1")
    assert wait_for(lambda: (_images(reg_daemon, action="list")["inventory"]["sync"].get(ref) or {})
                    .get("state") == "ok", 120), reg_daemon.log()
    pinned = f"{reg.host}/cbt/busybox@{reg.digests['cbt/busybox:1']}"
    mom = mom_factory(reg_daemon)
    body = f"#!/bin/sh\n#CBATCH --image={pinned}\necho \"ran $CBATCH_IMAGE $CBATCH_IMAGE_DIGEST\"\n".encode()
    r = mom.submit(body, carol.name, queue="exacttag").wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == f"ran {pinned} {pinned}\n".encode()
    other = f"{reg.host}/cbt/busybox@sha256:" + "5" * 64
    r = mom.submit(body.replace(pinned.encode(), other.encode()), carol.name, queue="exacttag").wait(120)
    assert r.exit_status == 125 and r.stdout == b""
    assert r.stderr.decode().splitlines() == [
        f"cbatch: image: not allowed in queue exacttag: {other} (allowed: {ref}, native; a digest only as the "
        "image of an allowed tag on this node)"]
