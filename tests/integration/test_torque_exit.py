"""End-to-end 4: the script's exit status is the job's exit_status."""

from __future__ import annotations

import pytest

from torque_helpers import script


@pytest.mark.parametrize("status", [0, 1, 42, 255])
def test_exit_status(mom, alice, status):
    r = mom.submit(script(f"echo bye; exit {status}"), alice.name).wait(120)
    assert r.exit_status == status, r.stderr
    assert r.stdout == b"bye\n"
    assert r.stderr == b""


def test_killed_by_signal_is_128_plus_n(mom, alice):
    r = mom.submit(script("echo dying; kill -9 $$; echo not-reached"), alice.name).wait(120)
    assert r.exit_status == 137, r.stderr
    assert r.stdout == b"dying\n"


def test_status_of_last_command(mom, alice):
    r = mom.submit(script("false"), alice.name).wait(120)
    assert r.exit_status == 1
