"""A tiny real run of the benchmark (``python -m bench``) writes every file it promises: results.json,
results.md and scaling.svg, with every mode measured or reported "not available: <reason>".

The numbers of such a run mean nothing and are not looked at; what is checked is that each mode really ran
jobs (a latency value per mode, a scaling point per mode and level) and that the files agree. The probe is
installed where ``CBATCH_BENCH_TOOL`` says (default /opt/cbatch/bench/benchtool, as scripts/bench does).
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"
TINY = ["latency_reps=1", "throughput_jobs=1", "footprint_jobs=1", "footprint_docker_jobs=1", "scaling_top=2"]


def test_tiny_bench_run_writes_every_file(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench", "--quick", "--only", "latency", "throughput", "footprint", "scaling",
            "--out", str(out)]
    for item in TINY:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == {}
    assert doc["modes"][:2] == ["native", "docker_run"]
    cbatch = [m for m in doc["modes"] if m.startswith("cbatch_")]
    assert "cbatch_docker_py" in cbatch
    wanted = {f"cbatch_{e}_{c}" for e in ("docker", "direct") for c in ("py", "c")}
    assert set(cbatch) | set(doc["not_available"]) == wanted
    assert not set(cbatch) & set(doc["not_available"])
    assert all(why.startswith("not available: ") for why in doc["not_available"].values())
    for mode in doc["modes"] + ["runc"]:
        assert doc["start_latency_ms"][mode] > 0, mode
        assert set(doc["scaling_latency_ms"][mode]) == {"1", "2"}, mode
        assert all(v > 0 for v in doc["scaling_latency_ms"][mode].values()), mode
    for mode in cbatch:
        assert doc["starter_rss_mib"][mode] > 0
        assert doc["throughput_jobs_per_s"]["c1"][mode] > 0
        assert set(doc["scaling_daemon_cpu_ms_per_job"][mode]) == {"1", "2"}

    md = (out / "results.md").read_text()
    assert "](scaling.svg)" in md
    for mode, why in doc["not_available"].items():
        assert f"- {mode}: {why}" in md

    root = ET.fromstring((out / "scaling.svg").read_text())
    lines = root.findall(f"{SVG}polyline")
    # one latency line per mode and runc, one CPU line per cbatch mode
    assert len(lines) == len(doc["modes"]) + 1 + len(cbatch)
