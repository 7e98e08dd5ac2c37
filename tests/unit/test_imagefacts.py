"""The direct engine's image facts: cached by image ID, never by name (a re-tag cannot swap the image a
job was decided on), re-inspected when the layers went, bounded."""

from __future__ import annotations

import shutil

import pytest

from cbatch.core.errors import EngineError
from cbatch.engines import imagefacts


def _id(n: int) -> str:
    return "sha256:" + f"{n:064x}"


class FakeDocker:
    """Docker's image inspect over a table of names and ids (``tags``: name -> id)."""

    def __init__(self, images: dict, tags: dict) -> None:
        self.images, self.tags, self.asked = images, tags, []
        self.api = self

    def inspect_image(self, ref: str) -> dict:
        self.asked.append(ref)
        image_id = self.tags.get(ref, ref)
        if image_id not in self.images:
            raise EngineError("image", "not found", ref)
        return self.images[image_id]

    def _call(self, _what, _subject, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _image(tmp_path, n: int, marker: str) -> dict:
    upper = tmp_path / f"layer{n}" / "diff"
    upper.mkdir(parents=True)
    return {"Id": _id(n), "Config": {"Env": [f"MARK={marker}"], "Volumes": {"data/": {}}},
            "GraphDriver": {"Name": "overlay2", "Data": {"UpperDir": str(upper)}}}


@pytest.fixture
def docker(tmp_path):
    return FakeDocker({_id(1): _image(tmp_path, 1, "A"), _id(2): _image(tmp_path, 2, "B")}, {"app:1": _id(1)})


def test_an_image_id_is_inspected_once(docker):
    facts = imagefacts.Facts(docker)
    first = facts.get(_id(1))
    assert facts.get(_id(1)) == first and first[0] == _id(1) and first[1]["Env"] == ["MARK=A"]
    assert docker.asked == [_id(1)]


def test_a_name_is_never_cached(docker):
    facts = imagefacts.Facts(docker)
    assert facts.get("app:1")[0] == _id(1)
    assert facts.get("app:1")[0] == _id(1)
    assert docker.asked == ["app:1", "app:1"]


def test_a_retag_after_the_decision_does_not_change_the_image_started(docker):
    # The daemon checked app:1 = image 1 (its id is in the spec); app:1 is then moved to image 2.
    facts = imagefacts.Facts(docker)
    facts.get("app:1")
    docker.tags["app:1"] = _id(2)
    image_id, conf, _dirs = facts.get(_id(1))
    assert image_id == _id(1) and conf["Env"] == ["MARK=A"]
    # ... and a job decided on the new tag gets the new image, cached or not.
    assert facts.get(_id(2))[1]["Env"] == ["MARK=B"]


def test_layers_gone_means_inspect_again(docker, tmp_path):
    facts = imagefacts.Facts(docker)
    facts.get(_id(1))
    shutil.rmtree(tmp_path / "layer1")              # removed (and maybe re-pulled into new directories)
    with pytest.raises(EngineError) as exc:
        facts.get(_id(1))
    assert exc.value.problem == "layer missing"
    assert docker.asked == [_id(1), _id(1)]
    del docker.images[_id(1)]
    with pytest.raises(EngineError):
        facts.get(_id(1))


def test_the_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefacts, "MAX_ENTRIES", 2)
    docker = FakeDocker({_id(n): _image(tmp_path, n, str(n)) for n in range(1, 4)}, {})
    facts = imagefacts.Facts(docker)
    for n in (1, 2, 1, 3):                          # 2 is the least recently used when 3 comes
        facts.get(_id(n))
    assert list(facts._by_id) == [_id(1), _id(3)]
    facts.get(_id(2))
    assert docker.asked.count(_id(2)) == 2


def test_volumes_are_normalized():
    assert imagefacts.volumes({"Volumes": {"data/": {}, "/var//log": {}}}) == ["/var/log", "/data"]     # sorted as the image lists them
    assert imagefacts.volumes({}) == []
