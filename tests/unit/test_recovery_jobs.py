"""cbatch.daemon.recovery: starts recorded before the engine was asked, and Slurm jobs that ended while
cbatchd was down (issue #10 items 11, 12). A fake engine; the real registry on a temporary directory."""

from __future__ import annotations

import os
import threading
import time
import types

from cbatch.core.job import Registration
from cbatch.daemon import cleanup, recovery
from cbatch.daemon.adoptions import Adoptions
from cbatch.daemon.registry import Registry


class FakeEngine:
    def __init__(self, containers):
        self.containers = dict(containers)     # cid -> (labels, status)
        self.removed = []
        self.fail_lists = 0

    def list_ids(self, labels):
        if self.fail_lists:
            from cbatch.core.errors import EngineError
            self.fail_lists -= 1
            raise EngineError("engine", "not reachable", "unix:///nowhere")
        return [c for c, (lab, _st) in self.containers.items() if all(lab.get(k) == v for k, v in labels.items())]

    def status(self, cid):
        return self.containers.get(cid, ({}, "gone"))[1]

    def remove(self, cid):
        self.removed.append(cid)
        self.containers.pop(cid, None)


def _daemon(tmp_path, engine, monkeypatch):
    # Mount staging is not what these tests are about (and its clean-up mounts): left out.
    monkeypatch.setattr(recovery, "unpin_stale", lambda daemon: None)
    # forget_job's engine sweep and cgroup tidy are cleanup's own business (tested with the daemon).
    monkeypatch.setattr(cleanup, "forget_job", lambda daemon, job_id: daemon.registry.unregister(job_id))
    d = types.SimpleNamespace(engine=engine, instance="inst", registry=Registry(str(tmp_path / "state")),
                              adoptions=Adoptions(), lock=threading.Lock(), sweeping=threading.Lock(),
                              started_at=time.time() + 3600,
                              config=types.SimpleNamespace(daemon=types.SimpleNamespace(mount_dir=str(tmp_path / "m"))),
                              mount_root=str(tmp_path / "m" / "inst"))
    return d


def _register(d, job_id="1.vm", session=None):
    reg = Registration(job_id=job_id, user="root", group="root", name="n", resource_list="", queue="batch",
                       account="", script_path="/s.SC", session_id=session or os.getpid(), registered_at=time.time())
    d.registry.register(reg)
    assert d.registry.claim_start(job_id)
    return reg


def _labels(job_id, peer):
    return {"cbatch.instance": "inst", "cbatch.job": job_id, "cbatch.peer": str(peer)}


def _me():
    from cbatch.daemon import peers
    return {"peer": os.getpid(), "peer_start": peers.start_time(os.getpid()), "kind": "job", "uid": os.getuid()}


def test_pending_start_whose_container_runs_is_adopted(tmp_path, monkeypatch):
    """The daemon died between the engine's start and recording the id: the container is found by its
    labels and waits for its client, who reattaches without knowing the id."""
    eng = FakeEngine({"c1": (_labels("1.vm", os.getpid()), "running")})
    d = _daemon(tmp_path, eng, monkeypatch)
    _register(d)
    d.registry.add_container("1.vm", recovery.pending_key("cbatch-1.vm"), _me())
    recovery.recover(d)
    assert list(d.registry.get("1.vm").containers) == ["c1"]
    assert "c1" in d.adoptions.cids() and not eng.removed
    peer = types.SimpleNamespace(pid=os.getpid(), uid=os.getuid())
    assert recovery.waiting_for(d, peer) == ("c1", "1.vm")
    assert d.registry.get("1.vm").started


def test_pending_start_never_started_is_removed_and_released(tmp_path, monkeypatch):
    """Created but never started: no user code ran; it is removed and the start released (the starter asks
    again) - before, the job's starter exited 125 "closed the connection without a reply"."""
    eng = FakeEngine({"c2": (_labels("1.vm", os.getpid()), "created")})
    d = _daemon(tmp_path, eng, monkeypatch)
    _register(d)
    d.registry.add_container("1.vm", recovery.pending_key("cbatch-1.vm"), _me())
    recovery.recover(d)
    assert eng.removed == ["c2"]
    rec = d.registry.get("1.vm")
    assert rec.containers == {} and not rec.started
    assert recovery.waiting_for(d, types.SimpleNamespace(pid=os.getpid(), uid=os.getuid())) == (None, None)
    assert d.registry.claim_start("1.vm")          # the starter's second start is allowed


def test_claim_without_container_releases_the_start(tmp_path, monkeypatch):
    eng = FakeEngine({})
    d = _daemon(tmp_path, eng, monkeypatch)
    _register(d)
    d.registry.add_container("1.vm", recovery.pending_key("start"), _me())
    recovery.recover(d)
    assert not d.registry.get("1.vm").started and d.registry.get("1.vm").containers == {}


def test_recovery_waits_for_the_engine(tmp_path, monkeypatch):
    """An engine that is down at start-up is retried (in the background; attach waits for it), not skipped:
    its containers would lose their clients."""
    monkeypatch.setattr(recovery, "ENGINE_RETRY_EVERY", 0.01)
    eng = FakeEngine({"c3": (_labels("1.vm", os.getpid()), "running")})
    eng.fail_lists = 3
    d = _daemon(tmp_path, eng, monkeypatch)
    _register(d)
    d.registry.add_container("1.vm", "c3", _me())
    recovery.recover(d)                      # returns at once: the daemon listens meanwhile
    assert d.recovered.wait(10)
    assert eng.fail_lists == 0 and "c3" in d.adoptions.cids()


def test_slurm_job_ended(tmp_path):
    root = tmp_path / "cg"
    job = root / "memory" / "slurm_node1" / "uid_1001" / "job_42"
    job.mkdir(parents=True)
    old = time.time() - 3600
    reg = Registration(job_id="42", user="u", group="g", name="n", resource_list="", queue="p", account="",
                       script_path="/s", batch="slurm", registered_at=old, uid=1001)
    assert not recovery.slurm_job_ended(reg, str(root))
    job.rmdir()
    assert recovery.slurm_job_ended(reg, str(root))
    young = Registration(**{**reg.to_dict(), "registered_at": time.time()})
    assert not recovery.slurm_job_ended(young, str(root))          # its cgroup may not exist yet
    assert not recovery.slurm_job_ended(reg, str(tmp_path / "no-slurm-here"))   # cannot tell: keep it


def test_a_start_records_its_claim_and_each_step_in_one_write_each(tmp_path, monkeypatch):
    # The start path writes the registry twice (the claim with its pending start, then the container),
    # never leaving a moment where a restarted daemon would find neither the old entry nor the new one.
    reg = Registry(str(tmp_path / "state"))
    reg.register(Registration(job_id="1.vm", user="root", group="root", name="n", resource_list="", queue="batch",
                              account="", script_path="/s.SC", session_id=os.getpid(), registered_at=time.time()))
    saves = []
    real = reg._save
    monkeypatch.setattr(reg, "_save", lambda rec: saves.append(sorted(rec.containers)) or real(rec))
    claim, pending = recovery.pending_key("start"), recovery.pending_key("cbatch-1.vm")
    assert reg.claim_start("1.vm", (claim, _me()), write=False)
    assert not reg.claim_start("1.vm", (claim, _me()))             # in memory already: one start
    # A daemon dying now finds the job unstarted (as recovery leaves a written claim): it may start again.
    assert not Registry(str(tmp_path / "state")).get("1.vm").started
    reg.replace_container("1.vm", claim, pending, _me())
    reg.replace_container("1.vm", pending, "c1", _me())
    assert saves == [[pending], ["c1"]]
    again = Registry(str(tmp_path / "state")).get("1.vm")          # what a restarted daemon reads
    assert again.started and list(again.containers) == ["c1"]
    reg.replace_container("1.vm", "not-there", "c2", _me())        # cbatch run: no claim to replace
    assert sorted(Registry(str(tmp_path / "state")).get("1.vm").containers) == ["c1", "c2"]


def test_a_removed_container_is_dropped_unwritten_and_recovery_drops_it_too(tmp_path, monkeypatch):
    # cleanup.remove_container forgets the container in memory only (one fsync less per job end); a daemon
    # that dies before the record's next write finds the id on disk, and recovery drops it: the engine has
    # no such container.
    engine = FakeEngine({"c1": (_labels("1.vm", os.getpid()), "running")})
    d = _daemon(tmp_path, engine, monkeypatch)
    _register(d)
    d.registry.add_container("1.vm", "c1", {"peer": os.getpid(), "kind": "job"})
    assert cleanup.remove_container(d, "1.vm", "c1") and engine.removed == ["c1"]
    assert d.registry.get("1.vm").containers == {}
    restarted = _daemon(tmp_path, engine, monkeypatch)
    assert list(restarted.registry.get("1.vm").containers) == ["c1"]       # the unwritten drop
    recovery.recover(restarted)
    assert restarted.registry.get("1.vm").containers == {}
    assert Registry(str(tmp_path / "state")).get("1.vm").containers == {}   # recovery's drop is written
    assert engine.removed == ["c1"] and not len(restarted.adoptions)
    # The next change of the record writes the drop with it.
    d.registry.add_container("1.vm", "c2", {"peer": os.getpid(), "kind": "run"})
    assert list(Registry(str(tmp_path / "state")).get("1.vm").containers) == ["c2"]
