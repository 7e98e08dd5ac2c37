"""cbatch-exec ``--ids`` run directly on the host as root: exact ids, no capability left, numbers only.

Run with a root helper (the test runs as root); inside containers the same path is covered by
test_image_identity.py. Before the option existed every case here failed with the usage line (125).
"""

from __future__ import annotations

import subprocess

import pytest

from cbatch.core.errors import EngineError
from cbatch.engines.docker import helper_ids_args

pytestmark = [pytest.mark.docker, pytest.mark.root]

STATUS = "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status"


def _run(helper, *args):
    return subprocess.run([helper, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def _status(out: bytes) -> dict:
    return {k: v.split() for k, _, v in (l.partition(":") for l in out.decode().splitlines())}


def test_ids_are_exactly_the_numbers_and_no_capability_remains(helper):
    r = _run(helper, *helper_ids_args(4242, 4343, (4343, 5000, 0)), "--", "/bin/sh", "-c", STATUS)
    assert r.returncode == 0, r.stderr
    st = _status(r.stdout)
    assert st["Uid"] == ["4242"] * 4 and st["Gid"] == ["4343"] * 4, st
    assert sorted(st["Groups"], key=int) == ["0", "4343", "5000"], st   # gid 0 only when the host says so
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap][0], 16) == 0, (cap, st)


def test_empty_group_list(helper):
    r = _run(helper, "--ids", "4242:4343:", "--", "/bin/sh", "-c", STATUS)
    assert r.returncode == 0, r.stderr
    assert _status(r.stdout)["Groups"] == []


@pytest.mark.parametrize("value", ["4242:4343", "alice:4343:", "4242:root:", "4242:4343:1,x", "4242:4343:1,",
                                   "-1:4343:", "4294967295:1:", "4242::", ":4343:", "4242:4343:,1"])
def test_anything_but_numbers_is_125_and_nothing_runs(helper, value):
    r = _run(helper, "--ids", value, "--", "/bin/echo", "ran")
    assert r.returncode == 125 and r.stdout == b"", (r.returncode, r.stdout)
    assert r.stderr.startswith(b"cbatch: helper: bad --ids: ") and r.stderr.count(b"\n") == 1, r.stderr


def test_ids_args_refuse_non_numbers():
    assert helper_ids_args(1001, 1003, (1003, 1001)) == ["--ids", "1001:1003:1003,1001"]
    for bad in ((True, 1, ()), (1, -1, ()), (1, 1, ("7",)), (2 ** 32 - 1, 1, ())):
        with pytest.raises(EngineError):
            helper_ids_args(*bad)
