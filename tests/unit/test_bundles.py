"""The direct engine's state on disk stays bounded: the event record rotates, empty instance directories
and the records of long-gone instances go, idempotently."""

from __future__ import annotations

import json
import os

from cbatch.engines import bundles


def test_event_record_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(bundles, "EVENTS_MAX", 4096)
    for n in range(400):                                   # ~30 KiB of events
        bundles.event(str(tmp_path), "inst", f"direct-c{n}", "destroy")
    events = tmp_path / "events"
    assert sorted(os.listdir(events)) == ["inst.jsonl", "inst.jsonl.1"]
    assert all(p.stat().st_size <= 4096 + 200 for p in events.iterdir())
    last = json.loads((events / "inst.jsonl").read_text().splitlines()[-1])
    assert last["id"] == "direct-c399"                     # the newest events are the ones kept


def test_instance_directory_goes_with_its_last_bundle(tmp_path):
    (tmp_path / "inst" / "a").mkdir(parents=True)
    bundles.drop_instance_dir(str(tmp_path), "inst")
    assert (tmp_path / "inst" / "a").is_dir()              # not empty: kept
    (tmp_path / "inst" / "a").rmdir()
    bundles.drop_instance_dir(str(tmp_path), "inst")
    bundles.drop_instance_dir(str(tmp_path), "inst")       # idempotent
    assert not (tmp_path / "inst").exists()


def test_startup_sweep_removes_only_what_no_container_needs(tmp_path):
    root = str(tmp_path)
    for inst in ("mine", "old", "busy", "recent"):
        bundles.event(root, inst, "direct-x", "destroy")
    (tmp_path / "old").mkdir()                             # empty: goes
    (tmp_path / "mine").mkdir()                            # the daemon's own: stays
    (tmp_path / "busy" / "c1").mkdir(parents=True)         # a container left: stays, with its record
    (tmp_path / "runc").mkdir()
    day_ago = bundles.EVENTS_KEEP + 60
    for inst in ("mine", "old", "busy"):
        path = tmp_path / "events" / f"{inst}.jsonl"
        os.utime(path, (path.stat().st_mtime - day_ago,) * 2)
    (tmp_path / "events" / "old.jsonl.1").write_text("")
    os.utime(tmp_path / "events" / "old.jsonl.1", (1, 1))
    removed = bundles.sweep(root, "mine")
    assert sorted(os.path.relpath(p, root) for p in removed) == ["events/old.jsonl", "events/old.jsonl.1", "old"]
    assert sorted(os.listdir(tmp_path / "events")) == ["busy.jsonl", "mine.jsonl", "recent.jsonl"]
    assert (tmp_path / "mine").is_dir() and (tmp_path / "busy" / "c1").is_dir() and (tmp_path / "runc").is_dir()
    assert bundles.sweep(root, "mine") == []               # idempotent


def _bundle(root, inst: str, name: str, job: str, meta: bool = True):
    path = root / inst / name
    path.mkdir(parents=True)
    if meta:
        (path / "meta.json").write_text(json.dumps({"name": name, "labels": {"cbatch.job": job,
                                                                             "cbatch.instance": inst}}))
    return path


def test_one_cleanup_reads_each_bundle_meta_once(tmp_path):
    """Listing, removing and listing again (a job's cleanup) reads another job's bundle once, not twice;
    what may match (the job's own bundles, a bundle without its meta yet, a new or re-made bundle) is read
    again, so the second listing is what a fresh scan would say."""
    reads = []

    def meta_of(path):
        reads.append(os.path.relpath(path, tmp_path))
        return bundles.read_json(path)

    for n in range(5):
        _bundle(tmp_path, "inst", f"other{n}", f"{n}.vm")
    mine = _bundle(tmp_path, "inst", "mine", "9.vm")
    stuck = _bundle(tmp_path, "inst", "stuck", "9.vm")
    half = _bundle(tmp_path, "inst", "half", "9.vm", meta=False)           # meta.json not written yet
    _bundle(tmp_path, "elsewhere", "x", "9.vm")                            # another instance: not looked at
    labels = {"cbatch.job": "9.vm", "cbatch.instance": "inst"}
    memo: dict = {}
    assert sorted(bundles.scan(str(tmp_path), labels, meta_of, memo)) == ["mine", "stuck"]
    assert len(reads) == 8 and len(memo) == 5
    # Between the two listings: "mine" removed, "half" got its meta, another job's bundle was re-made (a new
    # directory under the same name, made before the old one went so it cannot reuse its inode) with this
    # job's labels, and a new bundle of this job appeared.
    (mine / "meta.json").unlink()
    mine.rmdir()
    (half / "meta.json").write_text(json.dumps({"labels": labels}))
    new = _bundle(tmp_path, "inst", "other0.new", "9.vm")
    for f in (tmp_path / "inst" / "other0").iterdir():
        f.unlink()
    (tmp_path / "inst" / "other0").rmdir()
    new.rename(tmp_path / "inst" / "other0")
    _bundle(tmp_path, "inst", "late", "9.vm")
    reads.clear()
    again = sorted(bundles.scan(str(tmp_path), labels, meta_of, memo))
    assert again == sorted(bundles.scan(str(tmp_path), labels, bundles.read_json)) == \
        ["half", "late", "other0", "stuck"]
    assert sorted(reads) == [f"inst/{n}/meta.json" for n in ("half", "late", "other0", "stuck")]
    assert stuck.is_dir()


def test_scan_without_a_memo_reads_every_time(tmp_path):
    reads = []
    _bundle(tmp_path, "inst", "a", "1.vm")
    _bundle(tmp_path, "inst", "b", "2.vm")

    def meta_of(path):
        reads.append(path)
        return bundles.read_json(path)

    for _ in range(2):
        assert bundles.scan(str(tmp_path), {"cbatch.job": "1.vm"}, meta_of) == ["a"]
    assert len(reads) == 4


def test_restart_adoption_and_hold_drop_read_each_meta_once(tmp_path, monkeypatch):
    """After a restart (adopt) and at a hold sweep (drop_idle_holds) the direct engine takes each of its
    instance's containers with the record the scan read: one read of each meta.json, none of another instance."""
    from cbatch.engines.direct import DirectEngine

    for name, image in (("a", "sha256:1"), ("b", "sha256:2"), ("c", None)):
        meta = _bundle(tmp_path, "inst", name, "1.vm") / "meta.json"
        record = json.loads(meta.read_text())
        record.update({"image_id": image} if image else {})
        meta.write_text(json.dumps(record))
    _bundle(tmp_path, "elsewhere", "x", "1.vm")
    reads = []
    real = bundles.read_json
    monkeypatch.setattr(bundles, "read_json", lambda path: reads.append(os.path.relpath(path, tmp_path)) or real(path))

    class Holds:
        adopted, kept = [], None

        def adopt(self, image_id, cid):
            self.adopted.append((image_id, cid))

        def sweep(self):
            pass

        def drop_idle(self, in_use):
            self.kept = sorted(i for i in ("sha256:1", "sha256:2", "sha256:3") if in_use(i))

    engine = DirectEngine(docker=None, bundles=str(tmp_path), instance="inst")
    engine.holds = Holds()
    monkeypatch.setattr(bundles, "sweep", lambda *args: None)
    engine.adopt()
    assert sorted(engine.holds.adopted) == [("sha256:1", "direct-a"), ("sha256:2", "direct-b")]
    assert sorted(reads) == ["inst/a/meta.json", "inst/b/meta.json", "inst/c/meta.json"]
    reads.clear()
    engine.drop_idle_holds()
    assert engine.holds.kept == ["sha256:1", "sha256:2"]
    assert sorted(reads) == ["inst/a/meta.json", "inst/b/meta.json", "inst/c/meta.json"]
