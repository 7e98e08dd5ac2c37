"""``cbatch check --node`` on the real OpenPBS server host: cbatch's hooks as qmgr reports them (present,
enabled, current), and one FAIL line when one is disabled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QMGR = "/opt/pbs/bin/qmgr"


def _check(cbatchd) -> list:
    cbatch = str(Path(sys.executable).parent / "cbatch")
    r = subprocess.run([cbatch, "check", "--node", "--config", str(cbatchd.config_path)], capture_output=True,
                       text=True, timeout=120)
    return [ln for ln in r.stdout.splitlines() if " PBS hook: " in ln]


def test_check_node_reads_cbatchs_hooks_from_qmgr(pbs, cbatchd):
    lines = _check(cbatchd)
    assert lines == ["OK   PBS hook: cbatch_exec: enabled, events execjob_end,execjob_launch, current [qmgr]",
                     "OK   PBS hook: cbatch_queuejob: enabled, events queuejob, current [qmgr]"], lines
    subprocess.run([QMGR, "-c", "set hook cbatch_queuejob enabled = false"], check=True, timeout=60)
    try:
        lines = _check(cbatchd)
    finally:
        subprocess.run([QMGR, "-c", "set hook cbatch_queuejob enabled = true"], check=True, timeout=60)
    assert lines[0].startswith("OK   PBS hook: cbatch_exec: "), lines
    assert lines[1] == ('FAIL PBS hook: cbatch_queuejob: disabled (qmgr -c "set hook cbatch_queuejob enabled = '
                        'true") [qmgr]'), lines
