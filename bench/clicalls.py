"""Benchmark 6: ``cbatch submit-filter`` and ``cbatch check SCRIPT`` per call, as whole process invocations.

Both run as the bench user on ``bench/typical.sh`` against the bench daemon's site config: the filter as
qsub runs it (the script on stdin, qsub's arguments after ``--``), ``check`` with the script path. A bare
``python -I -c pass`` of the same interpreter is timed alongside: the floor any Python command pays.
Each call's exit status must be 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.env import BENCH, VENV_BIN
from bench.stats import summary

TYPICAL = BENCH / "typical.sh"


def _as_user(user):
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name, "LANG": "C.UTF-8"}
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=groups, env=env, cwd=user.pw_dir)


def _time(argv, n: int, stdin: bytes, ids: dict) -> list:
    out = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, capture_output=True, **ids)
        elapsed = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
        if i:                       # the first call warms the page cache
            out.append(elapsed)
    return out


def run(bench, reps: int) -> dict:
    ids = _as_user(bench.user)
    cfg = str(bench.daemon.config_path)
    cbatch = str(VENV_BIN / "cbatch")
    script = TYPICAL.read_bytes()
    copy = Path(bench.user.pw_dir) / "typical.sh"      # readable by the user wherever the repo lives
    copy.write_bytes(script)
    os.chown(copy, bench.user.pw_uid, bench.user.pw_gid)
    try:
        return {"reps": reps, "ms": {
            "python_bare": summary(_time([sys.executable, "-I", "-c", "pass"], reps, b"", ids), 1),
            "submit_filter": summary(_time([cbatch, "submit-filter", "--config", cfg, "--", "-q", "batch",
                                            "-l", "nodes=1:ppn=2", "typical.sh"], reps, script, ids), 1),
            "check": summary(_time([cbatch, "check", "--config", cfg, str(copy)], reps, b"", ids), 1),
        }}
    finally:
        copy.unlink()
