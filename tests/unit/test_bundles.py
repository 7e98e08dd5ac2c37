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
