"""Every example script passes ``cbatch check`` with the example configs shipped for it, and the installed
default config (config/cbatch.yaml) changes nothing: native jobs run, container requests are refused."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from cbatch.admin.checks import check_script
from cbatch.core import config as configmod
from cbatch.core.errors import PolicyError

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "examples").glob("*.sh"))
CONFIGS = sorted((REPO / "config" / "examples").glob("*.yaml"))
pytestmark = pytest.mark.root
sys.path.insert(0, str(REPO / "tests" / "integration"))


@pytest.fixture(scope="module")
def alice():
    import users
    return users.ensure()["cbt-alice"]


@pytest.fixture
def in_home(alice, monkeypatch):
    monkeypatch.chdir(alice.home)       # cbatch check takes the cwd as the job's working directory


def test_there_are_examples():
    assert len(SCRIPTS) >= 4 and {c.name for c in CONFIGS} >= {"demo.yaml", "queues.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_passes_check_with_example_config(config, script, alice, in_home):
    cfg = configmod.load(str(config))
    out = io.StringIO()
    assert check_script(cfg, str(script), user=alice.name, out=out) == 0
    assert "queue: batch\n" in out.getvalue()             # torque.default_queue, not "(none)"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_installed_default_changes_nothing(script, alice, in_home):
    cfg = configmod.load(str(REPO / "config" / "cbatch.yaml"))
    out = io.StringIO()
    if b"--image=native" in script.read_bytes():
        assert check_script(cfg, str(script), user=alice.name, out=out) == 0 and "runs natively" in out.getvalue()
    else:
        with pytest.raises(PolicyError) as info:
            check_script(cfg, str(script), user=alice.name, out=out)
        assert info.value.message.startswith("cbatch: image: not allowed in queue (none): cbatch-test/")


def test_plain_script_runs_natively_under_the_installed_default(tmp_path, alice, in_home):
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/bash\necho hi\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(plain, 0o644)
    out = io.StringIO()
    cfg = configmod.load(str(REPO / "config" / "cbatch.yaml"))
    assert check_script(cfg, str(plain), user=alice.name, out=out) == 0
    assert "runs natively: /bin/bash" in out.getvalue()
