"""The test users as pytest fixtures, for every suite that runs jobs as them (tests/integration, and through
tests/torque/batchfixtures.py the real TORQUE and OpenPBS suites): a conftest imports them by name."""

from __future__ import annotations

import os
from typing import Dict

import pytest

import users as users_mod


@pytest.fixture(scope="session")
def users() -> Dict[str, users_mod.TestUser]:
    if os.geteuid() != 0:
        pytest.fail("tests that run jobs as the test users must run as root")
    return users_mod.ensure()


@pytest.fixture
def alice(users):
    return users["cbt-alice"]


@pytest.fixture
def bob(users):
    return users["cbt-bob"]


@pytest.fixture
def carol(users):
    """A user whose login shell is /bin/sh (for the busybox-based images)."""
    return users["cbt-carol"]
