"""``bench/results.json`` and ``bench/results.md`` from the benchmarks' results, and the machine description.

The JSON's top-level keys are the headline numbers (medians) issue #6 asks for; ``targets`` says which are
met; ``detail`` keeps every benchmark's full result (min, max, counts, profile) and ``settings`` the
repetition counts used.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

from bench.stats import fmt, ratio


def _first_line(argv) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> str:
    """One line: OS, CPU, cores, memory, kernel, engine, runc, Python, cgroup version."""
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


def headline(results: dict, started: float, settings: dict) -> dict:
    """The results.json document."""
    lat = results.get("latency") or {}
    thr = results.get("throughput") or {}
    foot = results.get("footprint") or {}
    outp = results.get("output") or {}
    over = results.get("overhead") or {}
    cli = results.get("clicalls") or {}
    start = {m: _med(lat, "latency_ms", m) for m in ("native", "cbatch", "docker_run", "runc")}
    doc = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "cbatch_install": install_mode(),
        "start_latency_ms": start,
        "throughput_jobs_per_s": thr.get("jobs_per_s"),
        "per_job_rss_mib": _med(foot, "cbatch", "rss_mib"),
        "per_job_pss_mib": _med(foot, "cbatch", "pss_mib"),
        "daemon_rss_mib": (foot.get("cbatch") or {}).get("daemon", {}).get("rss"),
        "docker_cli_rss_mib": _med(foot, "docker_run", "rss_mib"),
        "output_mib_per_s": {m: _med(outp, "writer_mib_per_s", m) for m in ("native", "cbatch", "docker_run")},
        "cpu_ratio": (over.get("cpu") or {}).get("ratio"),
        "io_ratio": (over.get("io") or {}).get("ratio"),
        "submit_filter_ms": _med(cli, "ms", "submit_filter"),
        "check_ms": _med(cli, "ms", "check"),
    }
    rates = doc["throughput_jobs_per_s"] or {}
    out = doc["output_mib_per_s"]
    doc["ratios"] = {
        "start_cbatch_vs_docker_run": ratio(start["cbatch"], start["docker_run"]),
        "start_cbatch_vs_runc": ratio(start["cbatch"], start["runc"]),
        "start_cbatch_vs_native": ratio(start["cbatch"], start["native"]),
        "throughput_cbatch_vs_docker_run": {c: ratio(r.get("cbatch"), r.get("docker_run")) for c, r in rates.items()},
        "output_cbatch_vs_native": ratio(out["cbatch"], out["native"]),
        "rss_cbatch_starter_vs_docker_cli": ratio(doc["per_job_rss_mib"], doc["docker_cli_rss_mib"]),
    }
    doc["targets"] = _targets(doc)
    doc["settings"] = settings
    doc["errors"] = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    doc["detail"] = results
    return doc


def _targets(doc: dict) -> dict:
    r = doc["ratios"]
    t = {}

    def add(name, target, value, ok):
        t[name] = {"target": target, "value": value, "met": None if value is None else bool(ok(value))}

    add("start_latency", "cbatch / docker run <= 1.0", r["start_cbatch_vs_docker_run"], lambda v: v <= 1.0)
    for c, v in (r["throughput_cbatch_vs_docker_run"] or {}).items():
        add(f"throughput_{c}", "cbatch / docker run >= 1.0", v, lambda v: v >= 1.0)
    add("per_job_rss", "<= 12 MiB", doc["per_job_rss_mib"], lambda v: v <= 12)
    add("output", "cbatch / native >= 0.90", r["output_cbatch_vs_native"], lambda v: v >= 0.90)
    add("cpu", "time cbatch / native <= 1.01", doc["cpu_ratio"], lambda v: v <= 1.01)
    add("io", "time cbatch / native <= 1.02", doc["io_ratio"], lambda v: v <= 1.02)
    return t


def markdown(doc: dict) -> str:
    """results.md: the headline table with targets, then each benchmark's detail."""
    d = doc["detail"]
    s = doc["settings"]
    L = ["# cbatch benchmark results", "",
         f"- machine: {doc['machine']}", f"- date: {doc['date']} (suite took {doc['duration_s']} s)",
         f"- cbatch installed in the venv: {doc['cbatch_install']}",
         f"- command: `scripts/bench` (settings: {json.dumps(s)})", "",
         "Values are medians (min–max) over the repetitions; ratios are between medians of the same run. "
         "Modes: native = the shell runs the script (pbs_mom without a job starter); cbatch = the real hooks, "
         "starter and cbatchd; docker run = the docker CLI with cbatch's flags (bench/starters/docker-run); "
         "runc = runc run on the same root filesystem, started directly. All other jobs go through the pbs_mom "
         "emulator (cbatch.emulator.local.Mom); the method of each benchmark is in its module's docstring (bench/*.py).",
         "",
         "## Targets", "", "| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    for name, t in doc["targets"].items():
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        L.append(f"| {name} | {t['target']} | {t['value']} | {met} |")
    lat = d.get("latency") or {}
    if "latency_ms" in lat:
        L += ["", f"## 1. Job start latency (starter exec -> first instruction of the script), {lat['reps']} runs",
              "", "| mode | start latency ms | exit path ms | whole job (submit -> end) ms |",
              "| --- | --- | --- | --- |"]
        for m, v in lat["latency_ms"].items():
            L.append(f"| {m} | {fmt(v)} | {fmt(lat['exit_ms'].get(m, {}))} | {fmt(lat['job_wall_ms'].get(m, {}))} |")
        L += ["", "Inside cbatchd during those jobs (timing probes, ms per call):", "",
              "| step | calls | ms |", "| --- | --- | --- |"]
        for k, v in (lat.get("daemon_trace_ms") or {}).items():
            L.append(f"| {k} | {v['n']} | {fmt(v)} |")
        L += ["", "cbatch start path, parts measured separately (ms):", "", "| part | ms |", "| --- | --- |"]
        for k, v in lat["profile"].items():
            L.append(f"| {k} | {fmt(v)} |")
    thr = d.get("throughput") or {}
    if "jobs_per_s" in thr:
        L += ["", f"## 2. Throughput ({thr['count']} trivial jobs per cell, through the mom emulator), jobs/s", "",
              "| concurrency | native | cbatch | docker run | cbatch / docker run |", "| --- | --- | --- | --- | --- |"]
        for c, r in thr["jobs_per_s"].items():
            L.append(f"| {c} | {r['native']} | {r['cbatch']} | {r['docker_run']} | "
                     f"{ratio(r['cbatch'], r['docker_run'])} |")
        cpu = thr.get("cpu_ms_per_job") or {}
        parts = ("machine", "job_processes", "cbatchd", "dockerd", "containerd", "other")
        L += ["", "CPU ms per job (job_processes: mom child, hooks, starter, shell, docker CLI; other: shims, "
              "runc, kernel, other users):", "", "| cell | mode | " + " | ".join(parts) + " |",
              "| --- | --- | " + " | ".join("---" for _ in parts) + " |"]
        for c, modes in cpu.items():
            for m, u in modes.items():
                L.append(f"| {c} | {m} | " + " | ".join(str(u.get(p, "")) for p in parts) + " |")
    foot = d.get("footprint") or {}
    if "cbatch" in foot:
        cb, dr = foot["cbatch"], foot["docker_run"]
        L += ["", "## 3. Memory per job (MiB)", "",
              "| process | jobs | RSS | PSS |", "| --- | --- | --- | --- |",
              f"| cbatch job starter | {cb['jobs']} | {fmt(cb['rss_mib'])} | {fmt(cb['pss_mib'])} |",
              f"| docker CLI (docker run) | {dr['jobs']} | {fmt(dr['rss_mib'])} | {fmt(dr['pss_mib'])} |",
              f"| containerd-shim per container (cbatch) | {cb['jobs']} | {fmt(cb['shim_rss_mib'])} | "
              f"{fmt(cb['shim_pss_mib'])} |",
              f"| containerd-shim per container (docker run) | {dr['jobs']} | {fmt(dr['shim_rss_mib'])} | "
              f"{fmt(dr['shim_pss_mib'])} |",
              f"| cbatchd, idle | - | {cb['daemon_idle'].get('rss')} | {cb['daemon_idle'].get('pss')} |",
              f"| cbatchd with {cb['jobs']} jobs | - | {cb['daemon'].get('rss')} | {cb['daemon'].get('pss')} |"]
        for name, m in (foot.get("python_floor") or {}).items():
            flags = "-I -S" if name.endswith("IS") else "-I"
            L.append(f"| idle python {flags} (floor) | - | {m.get('rss')} | {m.get('pss')} |")
    outp = d.get("output") or {}
    if "writer_mib_per_s" in outp:
        L += ["", f"## 4. Output: {outp['mib']} MiB to stdout (MiB/s); cbatch / native: {outp.get('ratio')} "
              f"(medians), {outp.get('ratio_best')} (best runs)", "",
              "| mode | runs | writer's rate | whole job |", "| --- | --- | --- | --- |"]
        for m, v in outp["writer_mib_per_s"].items():
            L.append(f"| {m} | {outp['reps'][m]} | {fmt(v)} | {fmt(outp['job_wall_mib_per_s'][m])} |")
    over = d.get("overhead") or {}
    if "cpu" in over:
        cpu, io = over["cpu"], over["io"]
        L += ["", f"## 5. Compute and I/O inside vs native ({over['reps']} runs each, seconds)", "",
              "| kernel | native | cbatch | ratio of medians | ratio of best runs |", "| --- | --- | --- | --- | --- |",
              f"| spin {cpu['millions']}M rounds (wall) | {fmt(cpu['seconds']['native'])} | "
              f"{fmt(cpu['seconds']['cbatch'])} | {cpu['ratio']} | {cpu.get('ratio_best')} |",
              f"| spin (CPU time) | {fmt(cpu['cpu_seconds']['native'])} | {fmt(cpu['cpu_seconds']['cbatch'])} | "
              f"{cpu.get('cpu_ratio')} | |",
              f"| write {io['mib']} MiB + fdatasync to $HOME | {fmt(io['seconds']['native'])} | "
              f"{fmt(io['seconds']['cbatch'])} | {io['ratio']} | {io.get('ratio_best')} |"]
    cli = d.get("clicalls") or {}
    if "ms" in cli:
        L += ["", f"## 6. Commands, per call ({cli['reps']} calls, ms)", "", "| command | ms |", "| --- | --- |"]
        for k, v in cli["ms"].items():
            L.append(f"| {k} | {fmt(v)} |")
    if doc["errors"]:
        L += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in doc["errors"].items()]
    return "\n".join(L) + "\n"


def write(doc: dict, directory: Path) -> None:
    (directory / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (directory / "results.md").write_text(markdown(doc))
