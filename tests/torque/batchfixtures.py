"""Fixtures both real-batch-system suites use (tests/torque, tests/openpbs): the test users and the session's
cbatchd on the default socket. A conftest imports the user fixtures by name and makes its cbatchd fixture
with :func:`cbatchd_fixture` (its own run directory, site config and instance)."""

from __future__ import annotations

import pytest

import trq
from torque_helpers import remove_instance_containers
from userfixtures import alice, bob, carol, users  # noqa: F401 - fixtures the conftests import from here


def cbatchd_fixture(run, site_config, instance: str, socket_path: str):
    """A session fixture ``cbatchd``: a real cbatchd on ``socket_path`` with ``site_config(helper)``; at the end
    it is stopped and every container of ``instance`` (both engines, and the image holders) removed."""
    @pytest.fixture(scope="session")
    def cbatchd(helper, test_images):
        """A real cbatchd on the default socket with the test site config (session)."""
        d = trq.start_cbatchd(run, site_config(helper), instance, socket_path)
        yield d
        d.stop()
        remove_instance_containers(instance)
    return cbatchd
