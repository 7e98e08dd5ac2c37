"""``bench/results.json`` from the benchmarks' results, and the machine description (``results.md`` is
:mod:`bench.reportmd`).

The JSON's top-level keys are the headline numbers (medians) issues #6 and #13 ask for, per mode
(``cbatch_<engine>_<client>`` and the baselines); ``not_available`` names the wanted modes that could not
run and why; ``targets`` says which of #13's targets are met; ``detail`` keeps every benchmark's full result (min, max, counts, profile) and ``settings`` the
repetition counts used.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from bench.stats import fmt, ratio


def _first_line(argv) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> str:
    """One line: OS, CPU, cores, memory, kernel, engine, runc, Python, cgroup version and attach tuning."""
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = platform.system()
    cgroup = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"
    from cbatch.host.cgroups import favor_dynmods
    favored = favor_dynmods()[0]
    # Every start's cgroup attach waits for an RCU grace period without it (docs/cbatchd.md, Node tuning).
    cgroup += f" (favordynmods on {favored})" if favored else " (no favordynmods)"
    docker = _first_line(["docker", "version", "--format", "{{.Server.Version}}"])
    runc = _first_line(["runc", "--version"])
    return (f"{debian}, {model}, {os.cpu_count()} cores, {mem_kib / 1024 / 1024:.1f} GiB, kernel "
            f"{platform.release()}, Docker {docker}, {runc}, Python {platform.python_version()}, cgroup {cgroup}")


def install_mode() -> str:
    """How cbatch is installed in the venv: "editable" (a .pth finder runs at every interpreter start-up,
    which costs the starter and hooks start-up time) or "regular" (what scripts/setup does)."""
    import glob
    import sys
    site = glob.glob(os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "lib", "python3*",
                                  "site-packages", "__editable__*cbatch*"))
    return "editable" if site else "regular"


def _med(d: Optional[dict], *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d.get("median") if isinstance(d, dict) else d


def _is_direct(mode: str) -> bool:
    return mode.startswith("cbatch_direct_")


def headline(results: dict, started: float, settings: dict, modes: Sequence[str] = (),
             missing: Optional[Dict[str, str]] = None, cbatch: Optional[str] = None) -> dict:
    """The results.json document. ``modes``: the mom-driven modes measured (baselines and cbatch modes);
    ``missing``: wanted cbatch modes not available, with the reason; ``cbatch``: the cbatch mode of the
    single-mode benchmarks (output, overhead)."""
    lat = results.get("latency") or {}
    thr = results.get("throughput") or {}
    foot = results.get("footprint") or {}
    outp = results.get("output") or {}
    over = results.get("overhead") or {}
    cli = results.get("clicalls") or {}
    scal = results.get("scaling") or {}
    modes = list(modes) or [m for m in (lat.get("latency_ms") or {}) if m != "runc"]
    cb_modes = [m for m in modes if m.startswith("cbatch_")]
    start = {m: _med(lat, "latency_ms", m) for m in modes + ["runc"]}
    fmodes = foot.get("cbatch_modes") or {}
    doc = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "cbatch_install": install_mode(),
        "modes": modes,
        "not_available": dict(missing or {}),
        "cbatch_mode": cbatch,
        "start_latency_ms": start,
        "throughput_jobs_per_s": thr.get("jobs_per_s"),
        "starter_rss_mib": {m: _med(fmodes, m, "rss_mib") for m in fmodes},
        "starter_pss_mib": {m: _med(fmodes, m, "pss_mib") for m in fmodes},
        "daemon_growth_per_job_mib": {m: v.get("daemon_growth_per_job_mib") for m, v in fmodes.items()},
        "docker_cli_rss_mib": _med(foot, "docker_run", "rss_mib"),
        "output_mib_per_s": {m: _med(outp, "writer_mib_per_s", m) for m in ("native", "cbatch", "docker_run")},
        "cpu_ratio": (over.get("cpu") or {}).get("ratio"),
        "io_ratio": (over.get("io") or {}).get("ratio"),
        "submit_filter_ms": _med(cli, "ms", "submit_filter"),
        "check_ms": _med(cli, "ms", "check"),
        "scaling_latency_ms": {m: {n: (s or {}).get("median") for n, s in v.items()}
                               for m, v in (scal.get("latency_ms") or {}).items()},
        "scaling_daemon_cpu_ms_per_job": scal.get("daemon_cpu_ms_per_job") or {},
        "direct_fallbacks": len(lat.get("direct_fallbacks") or []),
        "timing_breakdown_ms": {k: v.get("median") for k, v in (lat.get("timing_ms") or {}).items()},
    }
    rates = doc["throughput_jobs_per_s"] or {}
    out = doc["output_mib_per_s"]
    doc["ratios"] = {
        "start_vs_docker_run": {m: ratio(start.get(m), start.get("docker_run")) for m in cb_modes},
        "start_vs_runc": {m: ratio(start.get(m), start.get("runc")) for m in cb_modes},
        "start_vs_native": {m: ratio(start.get(m), start.get("native")) for m in cb_modes},
        "throughput_vs_docker_run": {m: {c: ratio(r.get(m), r.get("docker_run")) for c, r in rates.items()}
                                     for m in cb_modes},
        "output_cbatch_vs_native": ratio(out["cbatch"], out["native"]),
        "rss_starter_vs_docker_cli": {m: ratio(v, doc["docker_cli_rss_mib"])
                                      for m, v in doc["starter_rss_mib"].items()},
    }
    doc["targets"] = _targets(doc, cb_modes)
    doc["settings"] = settings
    doc["errors"] = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    doc["detail"] = results
    return doc


def _targets(doc: dict, cb_modes: Sequence[str]) -> dict:
    """Issue #13's targets, per cbatch mode where they depend on it; a mode not available is listed with
    value None, met None and its reason."""
    r = doc["ratios"]
    t = {}

    def add(name, target, value, ok, note=None):
        t[name] = {"target": target, "value": value, "met": None if value is None else bool(ok(value))}
        if note:
            t[name]["note"] = note

    for m in cb_modes:
        if _is_direct(m):
            add(f"start_{m}_vs_runc", f"{m} / runc run <= 2.0", r["start_vs_runc"].get(m), lambda v: v <= 2.0)
            add(f"start_{m}_vs_docker_run", f"{m} / docker run <= 0.333", r["start_vs_docker_run"].get(m),
                lambda v: v <= 1 / 3)
        else:
            add(f"start_{m}_vs_docker_run", f"{m} / docker run <= 1.0", r["start_vs_docker_run"].get(m),
                lambda v: v <= 1.0)
    for m in cb_modes:
        for c, v in (r["throughput_vs_docker_run"].get(m) or {}).items():
            add(f"throughput_{c}_{m}", f"{m} / docker run >= 3.0", v, lambda v: v >= 3.0)
    for m, v in doc["starter_rss_mib"].items():
        add(f"starter_rss_{m}", "<= 1 MiB", v, lambda v: v <= 1.0)
    for m, why in doc["not_available"].items():
        add(f"mode_{m}", "measured", None, None, why)
    cb = doc.get("cbatch_mode") or "cbatch"
    add("output", f"{cb} / native >= 0.90", r["output_cbatch_vs_native"], lambda v: v >= 0.90)
    add("cpu", f"time {cb} / native <= 1.01", doc["cpu_ratio"], lambda v: v <= 1.01)
    add("io", f"time {cb} / native <= 1.02", doc["io_ratio"], lambda v: v <= 1.02)
    return t


def write(doc: dict, directory: Path) -> None:
    """results.json and results.md into ``directory``."""
    from bench import reportmd
    (directory / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (directory / "results.md").write_text(reportmd.markdown(doc))
