"""Shared fixtures. Nothing here skips a test: an integration test whose engine or image is missing fails.

- ``engine``: an :class:`cbatch.engines.docker.Engine` on ``$CBATCH_ENGINE_URL`` (default the local socket).
- ``test_images``: session-wide; runs ``scripts/build-test-images`` once (cached by tag) and returns the tags.
- ``helper``: session-wide; builds ``libexec/cbatch-exec`` with make and returns its path.
- ``unique_instance``: a fresh ``cbatch.instance`` label value; every container carrying it is removed when
  the test ends, whatever the test did (tests still remove their own containers themselves).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORQUE_TESTS = ROOT / "tests" / "torque"


def torque_requested(config) -> bool:
    """The real-TORQUE tests run when a kit or an existing install is given (``CBATCH_TORQUE_KIT``,
    ``CBATCH_TORQUE=installed``) or when tests/torque is named on the command line."""
    if os.environ.get("CBATCH_TORQUE_KIT") or os.environ.get("CBATCH_TORQUE") == "installed":
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == TORQUE_TESTS or TORQUE_TESTS in path.parents:
            return True
    return False


OPENPBS_TESTS = ROOT / "tests" / "openpbs"


def openpbs_requested(config) -> bool:
    """The real-OpenPBS tests run with ``CBATCH_OPENPBS_KIT`` (build from the kit, cached by its stamp) or
    ``CBATCH_OPENPBS=installed`` (/opt/pbs), or when tests/openpbs is named on the command line. Never in
    the same run as tests/torque: both need ports 15001-15004."""
    if os.environ.get("CBATCH_OPENPBS_KIT") or os.environ.get("CBATCH_OPENPBS") == "installed":
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == OPENPBS_TESTS or OPENPBS_TESTS in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """Leave tests/torque and tests/openpbs out unless asked for (a batch system build and its ports)."""
    if Path(collection_path) == TORQUE_TESTS and not torque_requested(config):
        return True
    if Path(collection_path) == OPENPBS_TESTS and not openpbs_requested(config):
        return True
    return None


def pytest_report_header(config):
    if not torque_requested(config):
        return ("tests/torque not collected: no TORQUE given "
                "(set CBATCH_TORQUE_KIT=../shared/torque or CBATCH_TORQUE=installed)")
    return f"tests/torque: real TORQUE ({os.environ.get('CBATCH_TORQUE_KIT') or 'existing install'})"
ENGINE_URL = os.environ.get("CBATCH_ENGINE_URL", "unix:///var/run/docker.sock")


@pytest.fixture(scope="session")
def test_images():
    """Build (or find cached) the local test images; return {short name: tag}."""
    subprocess.run([str(ROOT / "scripts" / "build-test-images")], check=True)
    return {
        "busybox": "cbatch-test/busybox:1",
        "debian": "cbatch-test/debian:12",
        "setuid": "cbatch-test/setuid:1",
        "noshell": "cbatch-test/noshell:1",
        "entrypoint": "cbatch-test/entrypoint:1",
    }


@pytest.fixture(scope="session")
def helper():
    """Path of a freshly built static cbatch-exec (make is a no-op when it is up to date)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "libexec"), "all"], check=True)
    return str(ROOT / "libexec" / "cbatch-exec")


@pytest.fixture
def engine():
    """An Engine on the test engine URL."""
    from cbatch.engines.docker import Engine
    return Engine(ENGINE_URL, timeout=60)


@pytest.fixture
def unique_instance():
    """A unique cbatch.instance value; its containers are removed after the test."""
    from cbatch.engines.docker import Engine
    from cbatch.core.spec import LABEL_INSTANCE
    instance = "test-" + uuid.uuid4().hex[:12]
    yield instance
    leftovers = Engine(ENGINE_URL, timeout=60).cleanup({LABEL_INSTANCE: instance})
    assert not leftovers, f"containers left behind for {instance}: {leftovers}"
