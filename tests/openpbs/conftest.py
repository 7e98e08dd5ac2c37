"""Fixtures for the tests against a real OpenPBS 23.06 (pbs_comm, pbs_mom, pbs_sched, pbs_server and its own
PostgreSQL on this host), with cbatch's PBS hooks installed by ``cbatch install-hooks --pbs``.

Collected only when asked for (see tests/conftest.py): ``CBATCH_OPENPBS_KIT=../shared/openpbs`` or
``CBATCH_OPENPBS=installed`` (/opt/pbs), or when tests/openpbs is named on the command line. Run it under the
batch-system lock and never while TORQUE is up (same ports): ``scripts/openpbs-up`` refuses then.

- ``pbs``: OpenPBS up (``scripts/openpbs-up``; the hooks point at the venv running the tests, the job
  starter in ``<venv>/../libexec``), a real cbatchd on the default socket with the test site config below.
  Stopped at the end of the session (``scripts/openpbs-down``).
- queue ``workq`` is native by default, ``short`` runs in cbatch-test/debian:12 by default; the engine is
  ``auto`` unless ``CBATCH_TEST_ENGINES`` names one (``CBATCH_TEST_ENGINES=docker``: the Docker engine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "torque"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import batchfixtures  # noqa: E402
from batchfixtures import alice, bob, carol, users  # noqa: E402,F401 - fixtures
import opbs  # noqa: E402

VENV_BIN = Path(sys.executable).parent
RUN = Path("/run/cbatch-openpbs-test")
LIBEXEC = str(VENV_BIN.parent.parent / "libexec")
INSTANCE = "openpbs-test"
DEFAULT_SOCKET = "/run/cbatch/cbatchd.sock"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            for mark in ("openpbs", "root", "docker"):
                item.add_marker(getattr(pytest.mark, mark))


def queue_engine() -> str:
    """The queues' engine: ``CBATCH_TEST_ENGINES`` naming one engine (as for the integration suite) runs
    these tests on it; otherwise ``auto`` (direct for their jobs)."""
    engines = os.environ.get("CBATCH_TEST_ENGINES", "").split()
    return engines[0] if len(engines) == 1 else "auto"


def site_config(helper: str) -> dict:
    return {
        "engine": {"url": "unix:///var/run/docker.sock", "timeout": 60},
        "daemon": {"socket": DEFAULT_SOCKET, "state_dir": str(RUN / "state"), "instance": INSTANCE,
                   "stop_grace": 1.0, "helper": helper},
        "defaults": {"image": "native", "images": ["cbatch-test/*"], "native": True,
                     "hardening": {"pids_limit": 512}, "engine": queue_engine()},
        "queues": {"workq": {}, "short": {"image": "cbatch-test/debian:12"}},
    }


cbatchd = batchfixtures.cbatchd_fixture(RUN, site_config, INSTANCE, DEFAULT_SOCKET)


@pytest.fixture(scope="session")
def pbs(cbatchd, users):
    """OpenPBS up with cbatch's hooks (session); stopped at the end."""
    env = dict(os.environ, CBATCH=str(VENV_BIN / "cbatch"), CBATCH_LIBEXEC=LIBEXEC,
               CBATCH_CONFIG=str(cbatchd.config_path))
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "scripts" / "openpbs-up")], env=env, capture_output=True, text=True,
                       cwd=str(ROOT))
    if r.returncode != 0:
        pytest.fail(f"openpbs-up failed ({r.returncode}):\n{r.stderr[-4000:]}")
    print(f"\nopenpbs-up seconds: {time.monotonic() - t0:.1f}", file=sys.stderr)
    yield opbs.Pbs()
    subprocess.run([str(ROOT / "scripts" / "openpbs-down")], capture_output=True)


@pytest.fixture(scope="session")
def pbs_cg(pbs):
    """The same OpenPBS with its shipped pbs_cgroups hook enabled (tests using it are in test_zz_*, last)."""
    env = dict(os.environ, CBATCH=str(VENV_BIN / "cbatch"), CBATCH_LIBEXEC=LIBEXEC,
               CBATCH_CONFIG=str(RUN / "cbatch.yaml"))
    r = subprocess.run([str(ROOT / "scripts" / "openpbs-up"), "--cgroups"], env=env, capture_output=True,
                       text=True, cwd=str(ROOT))
    if r.returncode != 0:
        pytest.fail(f"openpbs-up --cgroups failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return pbs


@pytest.fixture
def wd(pbs, alice):
    path = pbs.workdir(alice)
    yield path
    pbs.cleanup(path)
