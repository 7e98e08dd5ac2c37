"""rootfs.check_targets (the direct engine's refusal of mount targets through the image's symlinks) is linear
and refuses exactly what the quadratic walk it replaced refused: compared with that walk, kept here as the
reference, on random image trees with symlinks and odd target spellings."""

from __future__ import annotations

import os
import random
import stat

import pytest

from cbatch.core.errors import EngineError
from cbatch.engines import rootfs


def reference(root: str, targets) -> None:
    """The previous implementation, O(targets^2): each component against every target."""
    tops = set(targets)
    for target in sorted(tops):
        parts = [p for p in target.split("/") if p]
        for n in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:n])
            if any(prefix != t and prefix.startswith(t.rstrip("/") + "/") for t in tops):
                break
            try:
                st = os.lstat(root + prefix)
            except FileNotFoundError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise EngineError("mount", "target passes through a symlink in the image",
                                  f"{target} ({prefix} -> {rootfs.resolve(root, prefix)})",
                                  "the image's symlinks are not followed for mounts; choose another"
                                  " target or an image without that link")


def outcome(fn, root, targets):
    try:
        fn(root, targets)
    except EngineError as exc:
        return exc.message
    except OSError as exc:          # a target under a file in the image: the same error escapes from both
        return f"{type(exc).__name__}: {exc.filename}"
    return None


NAMES = ("a", "b", "etc", "x", "home")


def _tree(root, rng: random.Random) -> list:
    """A small image tree: directories, files and symlinks (relative, absolute, dangling, to /etc)."""
    paths = [""]
    (root / "etc").mkdir(parents=True)
    for _ in range(25):
        parent = rng.choice(paths)
        path = f"{parent}/{rng.choice(NAMES)}"
        full = root / path.lstrip("/")
        if os.path.lexists(full) or not (root / parent.lstrip("/")).is_dir():
            continue
        kind = rng.random()
        if kind < 0.55:
            full.mkdir()
            paths.append(path)
        elif kind < 0.7:
            full.write_text("")
        else:
            full.symlink_to(rng.choice(["/etc", "../a", "b", "/nowhere", "/a/b"]))
    return paths


def _targets(paths: list, rng: random.Random) -> list:
    out = []
    for _ in range(rng.randint(1, 8)):
        base = rng.choice(paths) + "/" + "/".join(rng.choice(NAMES) for _ in range(rng.randint(0, 2)))
        base = "/" + base.strip("/")
        spelling = rng.random()
        if spelling < 0.1:
            base += "/"                         # trailing slash
        elif spelling < 0.15:
            base = base.replace("/", "//", 1)   # a doubled slash
        elif spelling < 0.18:
            base = "/"
        out.append(base)
    return out


@pytest.mark.parametrize("seed", range(60))
def test_same_refusals_as_the_quadratic_walk(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "rootfs"
    paths = _tree(root, rng)
    for _ in range(20):
        targets = _targets(paths, rng)
        assert outcome(rootfs.check_targets, str(root), targets) == outcome(reference, str(root), targets), targets


def test_attacks_are_refused(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "x").symlink_to("/etc")
    (root / "home" / "a").mkdir(parents=True)
    (root / "home" / "a" / "l").symlink_to("../../etc")
    for targets, bad in ((["/x/passwd"], "/x"), (["/home/a/l/shadow", "/home"], None),
                         (["/home/a/l/shadow", "/elsewhere"], "/home/a/l"), (["/x/", "/a"], "/x"),
                         (["/data", "/x/y/z"], "/x")):
        if bad is None:     # under another target: the host's directory, not the image's
            rootfs.check_targets(str(root), targets)
            continue
        with pytest.raises(EngineError) as exc:
            rootfs.check_targets(str(root), targets)
        assert f"({bad} -> " in exc.value.message


def test_each_shared_component_is_looked_at_once(tmp_path, monkeypatch):
    """Thousands of targets under a few image directories: one lstat per distinct component, not one per
    component of each target (and no comparison of each component with every target)."""
    root = tmp_path / "rootfs"
    (root / "data" / "sets").mkdir(parents=True)
    targets = [f"/data/sets/run{n}/out" for n in range(3000)] + ["/data/sets/run7"]
    calls = []
    real = os.lstat

    def counting(path, *a, **kw):
        calls.append(path)
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "lstat", counting)
    rootfs.check_targets(str(root), targets)
    # /data, /data/sets (shared), then each /data/sets/runN (absent: its /out is not looked at).
    assert len(calls) == 2 + 3000
    assert len(set(calls)) == len(calls)
