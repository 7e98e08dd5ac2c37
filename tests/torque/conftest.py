"""Fixtures for the tests against a real TORQUE 6.1 (pbs_server, pbs_mom, pbs_sched, trqauthd on this host).

Collected only when asked for (see tests/conftest.py): ``CBATCH_TORQUE_KIT=../shared/torque`` (build from the
kit, instant when already built) or ``CBATCH_TORQUE=installed`` (use /opt/torque and /opt/torque-cg), or when
tests/torque is named on the command line (then an existing install is used).

- ``torque``: the plain build up (``scripts/torque-up``), cbatch's hooks installed from the venv running the
  tests by ``cbatch install-hooks`` (README's admin steps; libexec ``<venv>/../libexec``), the submit filter
  as the server's SUBMITFILTER, and a real cbatchd on the default socket with the test site config below.
- ``torque_cg``: the same with the cgroup build. Tests using it are ordered last, so the switch happens once.
- ``users``: cbt-alice, cbt-bob, cbt-carol (tests/integration/users.py).
At the end of the session TORQUE is stopped (``scripts/torque-down``) and cbatchd with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import trq  # noqa: E402
import batchfixtures  # noqa: E402
from batchfixtures import alice, bob, carol, users  # noqa: E402,F401 - fixtures

VENV_BIN = Path(sys.executable).parent
RUN = Path("/run/cbatch-torque-test")
LIBEXEC = str(VENV_BIN.parent.parent / "libexec")      # /opt/cbatch-<name>/libexec: never the shared one
INSTANCE = "torque-test"
DEFAULT_SOCKET = "/run/cbatch/cbatchd.sock"


def pytest_collection_modifyitems(config, items):
    """Mark every test here; run the cgroup-build tests last so TORQUE is switched once."""
    mine = [i for i in items if HERE in Path(str(i.fspath)).parents]
    for item in mine:
        for mark in ("torque", "root", "docker"):
            item.add_marker(getattr(pytest.mark, mark))
    cg = [i for i in mine if "torque_cg" in getattr(i, "fixturenames", ())]
    if cg:
        rest = [i for i in items if i not in cg]
        items[:] = rest + cg


def site_config(helper: str) -> dict:
    """The test site config: queue batch native by default, queue short in a container by default; the
    test images allowed everywhere."""
    return {
        "engine": {"url": "unix:///var/run/docker.sock", "timeout": 60},
        "daemon": {"socket": DEFAULT_SOCKET, "state_dir": str(RUN / "state"), "instance": INSTANCE,
                   "stop_grace": 1.0, "helper": helper},
        "defaults": {"image": "native", "images": ["cbatch-test/*"], "native": True,
                     "hardening": {"pids_limit": 512}},
        "queues": {
            "batch": {},
            "short": {"image": "cbatch-test/debian:12"},
        },
    }


cbatchd = batchfixtures.cbatchd_fixture(RUN, site_config, INSTANCE, DEFAULT_SOCKET)


class _Ctl:
    """Which TORQUE variant is up; switches with scripts/torque-up."""

    def __init__(self, cbatchd):
        self.current = None
        self.cbatchd = cbatchd
        self.up_seconds = {}

    def up(self, variant: str) -> trq.Torque:
        if self.current != variant:
            import time
            env = dict(os.environ, CBATCH=str(VENV_BIN / "cbatch"), CBATCH_LIBEXEC=LIBEXEC)
            argv = [str(ROOT / "scripts" / "torque-up")] + (["--cgroups"] if variant == "cg" else [])
            t0 = time.monotonic()
            r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=str(ROOT))
            if r.returncode != 0:
                pytest.fail(f"torque-up {variant} failed ({r.returncode}):\n{r.stderr[-4000:]}")
            self.up_seconds[variant] = time.monotonic() - t0
            self.current = variant
            t = trq.Torque.for_variant(variant, LIBEXEC)
            t.install_submit_filter(RUN, self.cbatchd.config_path, VENV_BIN)
        return trq.Torque.for_variant(variant, LIBEXEC)


@pytest.fixture(scope="session")
def torque_ctl(cbatchd):
    ctl = _Ctl(cbatchd)
    yield ctl
    subprocess.run([str(ROOT / "scripts" / "torque-down")], capture_output=True)
    print(f"\ntorque-up seconds: {ctl.up_seconds}", file=sys.stderr)


@pytest.fixture
def torque(torque_ctl, users) -> trq.Torque:
    """The plain TORQUE build, up, with cbatch's hooks."""
    return torque_ctl.up("plain")


@pytest.fixture
def torque_cg(torque_ctl, users) -> trq.Torque:
    """The cgroup TORQUE build, up, with cbatch's hooks (tests using it run last)."""
    return torque_ctl.up("cg")
