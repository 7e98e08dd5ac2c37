"""``bench/results.md``: the results document (:func:`bench.report.headline`) as Markdown tables.

Modes are columns (or rows) in the order the run measured them; a mode that was asked for but is not
available appears once, in the modes list, with its reason.
"""

from __future__ import annotations

import json
from typing import List

from bench.stats import fmt, ratio
from bench.timing import is_total

_MET = {True: "yes", False: "**no**", None: "n/a"}


def _cell(v) -> str:
    return "n/a" if v is None else str(v)


def _head(doc: dict) -> List[str]:
    L = ["# cbatch benchmark results", "",
         f"- machine: {doc['machine']}", f"- date: {doc['date']} (suite took {doc['duration_s']} s)",
         f"- cbatch installed in the venv: {doc['cbatch_install']}",
         f"- command: `scripts/bench` (settings: {json.dumps(doc['settings'])})",
         f"- modes measured: {', '.join(doc.get('modes') or []) or 'n/a'}, runc"]
    for m, why in (doc.get("not_available") or {}).items():
        L.append(f"- {m}: {why}")
    fell = (doc.get("detail", {}).get("latency") or {}).get("direct_fallbacks") or []
    if fell:
        L.append(f"- **warning**: {len(fell)} direct-engine job(s) of the latency run fell back to the docker "
                 f"engine (cbatchd's log: {fell[0]}): the direct modes' numbers are not the direct engine's")
    L += ["",
          "Values are medians (min–max) over the repetitions; ratios are between medians of the same run. "
          "Modes: native = the shell runs the script (pbs_mom without a job starter); cbatch_<engine>_<client> = "
          "the real hooks, starter and cbatchd with that engine (docker: the Docker engine API; direct: runc on "
          "the image's own layers) and client (py: the Python shims; c: the static C client); docker_run = the "
          "docker CLI with cbatch's flags (bench/starters/docker-run); runc = runc run on the same root "
          "filesystem, started directly. All other jobs go through the pbs_mom emulator "
          "(cbatch.emulator.local.Mom); the method of each benchmark is in its module's docstring (bench/*.py).",
          "", "## Targets (issue #13)", "",
          "They are the bars for the path a node runs: the C client (`cbatch install-hooks` installs it). The "
          "py modes (the Python reference client: the same protocol, a Python interpreter per hook and per "
          "starter) are measured against the same bars.", "",
          "| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    for name, t in doc["targets"].items():
        met = _MET[t["met"]] if "note" not in t else t["note"]
        L.append(f"| {name} | {t['target']} | {_cell(t['value'])} | {met} |")
    return L


def _latency(lat: dict) -> List[str]:
    L = ["", f"## 1. Job start latency (starter exec -> first instruction of the script), {lat['reps']} runs",
         "", "| mode | start latency ms | exit path ms | whole job (submit -> end) ms |",
         "| --- | --- | --- | --- |"]
    for m, v in lat["latency_ms"].items():
        L.append(f"| {m} | {fmt(v)} | {fmt(lat['exit_ms'].get(m, {}))} | {fmt(lat['job_wall_ms'].get(m, {}))} |")
    timing = lat.get("timing_ms") or {}
    L += ["", "Where the direct path's milliseconds go (cbatchd's `CBATCH_TIMING=1` lines `timing <step> <ms>`, "
          "per start):", ""]
    if timing:
        L += ["| step | n | ms |", "| --- | --- | --- |"]
        for k, v in timing.items():
            L.append(f"| {k} | {v.get('n')} | {fmt(v) if 'min' in v else v.get('median')} |")
        whole = [v["median"] for k, v in timing.items() if is_total(k) and v.get("median") is not None]
        for m, v in lat["latency_ms"].items():
            if m.startswith("cbatch_direct_") and whole and v.get("median") is not None:
                L.append(f"\n{m}: start latency {v['median']} ms, of which the engine's call {whole[0]} ms; the "
                         f"other {round(v['median'] - whole[0], 1)} ms are the starter, cbatchd's request "
                         "(peer check, registry, script, policy, image check) and the container's init and exec.")
    else:
        L.append("no timing lines were logged (no direct-engine job ran, or this branch's engine has no "
                 "CBATCH_TIMING probes)")
    L += ["", "Inside cbatchd during those jobs (timing probes, ms per call):", "",
          "| step | calls | ms |", "| --- | --- | --- |"]
    for k, v in (lat.get("daemon_trace_ms") or {}).items():
        L.append(f"| {k} | {v['n']} | {fmt(v)} |")
    L += ["", "cbatch start path, parts measured separately (ms):", "", "| part | ms |", "| --- | --- |"]
    for k, v in (lat.get("profile") or {}).items():
        L.append(f"| {k} | {fmt(v)} |")
    return L


def _throughput(thr: dict) -> List[str]:
    rates = thr["jobs_per_s"]
    modes = list(next(iter(rates.values()), {}))
    cb = [m for m in modes if m.startswith("cbatch_")]
    L = ["", f"## 2. Throughput ({thr['count']} trivial jobs per cell, through the mom emulator), jobs/s", "",
         "| in flight | " + " | ".join(modes) + " | " + " | ".join(f"{m} / docker run" for m in cb) + " |",
         "| --- " * (1 + len(modes) + len(cb)) + "|"]
    for c, r in rates.items():
        L.append(f"| {c} | " + " | ".join(_cell(r.get(m)) for m in modes) + " | "
                 + " | ".join(_cell(ratio(r.get(m), r.get("docker_run"))) for m in cb) + " |")
    cpu = thr.get("cpu_ms_per_job") or {}
    parts = ("machine", "job_processes", "cbatchd", "dockerd", "containerd", "other")
    L += ["", "CPU ms per job (job_processes: mom child, hooks, starter, shell, docker CLI; other: shims, "
          "runc, kernel, other users):", "", "| cell | mode | " + " | ".join(parts) + " |",
          "| --- | --- | " + " | ".join("---" for _ in parts) + " |"]
    for c, by_mode in cpu.items():
        for m, u in by_mode.items():
            L.append(f"| {c} | {m} | " + " | ".join(str(u.get(p, "")) for p in parts) + " |")
    return L


def _footprint(foot: dict) -> List[str]:
    L = ["", "## 3. Memory per job (MiB)", "", "| process | jobs | RSS | PSS |", "| --- | --- | --- | --- |"]
    modes = foot.get("cbatch_modes") or {}
    for m, cb in modes.items():
        L.append(f"| job starter, {m} | {cb['jobs']} | {fmt(cb['rss_mib'])} | {fmt(cb['pss_mib'])} |")
    dr = foot.get("docker_run") or {}
    if dr:
        L.append(f"| docker CLI (docker run) | {dr['jobs']} | {fmt(dr['rss_mib'])} | {fmt(dr['pss_mib'])} |")
    for m, cb in modes.items():
        if cb.get("shim_rss_mib", {}).get("n"):
            L.append(f"| engine shim per container, {m} | {cb['jobs']} | {fmt(cb['shim_rss_mib'])} | "
                     f"{fmt(cb['shim_pss_mib'])} |")
    if dr:
        L.append(f"| containerd-shim per container (docker run) | {dr['jobs']} | {fmt(dr['shim_rss_mib'])} | "
                 f"{fmt(dr['shim_pss_mib'])} |")
    for name, m in (foot.get("python_floor") or {}).items():
        flags = "-I -S" if name.endswith("IS") else "-I"
        L.append(f"| idle python {flags} (floor) | - | {m.get('rss')} | {m.get('pss')} |")
    if modes:
        L += ["", "cbatchd (RSS MiB): idle, just before the jobs, with them running, growth per running job:", "",
              "| mode | jobs | idle | before | running | growth per job |", "| --- | --- | --- | --- | --- | --- |"]
        for m, cb in modes.items():
            L.append(f"| {m} | {cb['jobs']} | {cb.get('daemon_idle', {}).get('rss')} | "
                     f"{cb.get('daemon_before', {}).get('rss')} | {cb.get('daemon', {}).get('rss')} | "
                     f"{_cell(cb.get('daemon_growth_per_job_mib'))} |")
    return L


def _single(d: dict, cbatch: str) -> List[str]:
    L: List[str] = []
    outp = d.get("output") or {}
    if "writer_mib_per_s" in outp:
        L += ["", f"## 4. Output: {outp['mib']} MiB to stdout (MiB/s; cbatch = {cbatch}); cbatch / native: "
              f"{outp.get('ratio')} (medians), {outp.get('ratio_best')} (best runs)", "",
              "| mode | runs | writer's rate | whole job |", "| --- | --- | --- | --- |"]
        for m, v in outp["writer_mib_per_s"].items():
            L.append(f"| {m} | {outp['reps'][m]} | {fmt(v)} | {fmt(outp['job_wall_mib_per_s'][m])} |")
    over = d.get("overhead") or {}
    if "cpu" in over:
        cpu, io = over["cpu"], over["io"]
        L += ["", f"## 5. Compute and I/O inside ({cbatch}) vs native ({over['reps']} spin and "
              f"{io.get('reps', over['reps'])} write runs per mode, seconds)", "",
              "| kernel | native | cbatch | ratio of medians | ratio of best runs |",
              "| --- | --- | --- | --- | --- |",
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
    return L


def _scaling(sc: dict) -> List[str]:
    levels = [str(n) for n in sc.get("levels") or []]
    lat = sc.get("latency_ms") or {}
    L = ["", "## 7. Scaling: start latency (median ms) and cbatchd CPU per job against jobs starting at once", "",
         "![start latency and cbatchd CPU against concurrent starts](scaling.svg)", "",
         "| mode | " + " | ".join(levels) + " |", "| --- " * (1 + len(levels)) + "|"]
    for m, by_n in lat.items():
        L.append(f"| {m} | " + " | ".join(_cell((by_n.get(n) or {}).get("median")) for n in levels) + " |")
    for m, by_n in (sc.get("daemon_cpu_ms_per_job") or {}).items():
        L.append(f"| cbatchd CPU ms/job, {m} | " + " | ".join(_cell(by_n.get(n)) for n in levels) + " |")
    return L


def markdown(doc: dict) -> str:
    """results.md: modes, the targets, then each benchmark's detail."""
    d = doc["detail"]
    L = _head(doc)
    if "latency_ms" in (d.get("latency") or {}):
        L += _latency(d["latency"])
    if "jobs_per_s" in (d.get("throughput") or {}):
        L += _throughput(d["throughput"])
    if "cbatch_modes" in (d.get("footprint") or {}):
        L += _footprint(d["footprint"])
    L += _single(d, doc.get("cbatch_mode") or "cbatch")
    if "latency_ms" in (d.get("scaling") or {}):
        L += _scaling(d["scaling"])
    if doc["errors"]:
        L += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in doc["errors"].items()]
    return "\n".join(L) + "\n"


def readme_table(doc: dict) -> str:
    """The README's summary table: a column per mode (baselines, runc, each cbatch mode), medians."""
    modes = [m for m in doc.get("modes") or [] if not m.startswith("cbatch_")] + ["runc"] \
        + [m for m in doc.get("modes") or [] if m.startswith("cbatch_")]
    rates = doc.get("throughput_jobs_per_s") or {}
    scal = doc.get("scaling_latency_ms") or {}
    top = str(max((int(n) for v in scal.values() for n in v), default=0) or "")

    def row(label, get):
        return f"| {label} | " + " | ".join(_cell(get(m)) for m in modes) + " |"

    L = ["| | " + " | ".join(m.replace("_", " ") for m in modes) + " |", "| --- " * (1 + len(modes)) + "|",
         row("start latency, ms (median)", lambda m: doc["start_latency_ms"].get(m))]
    if rates:
        L.append(row(f"throughput, jobs/s at {' / '.join(c[1:] for c in rates)} in flight",
                     lambda m: None if m == "runc" or not any(m in r for r in rates.values())
                     else " / ".join(_cell(r.get(m)) for r in rates.values())))
    L.append(row("starter RSS, MiB", lambda m: (doc.get("starter_rss_mib") or {}).get(m)
                 if m != "docker_run" else doc.get("docker_cli_rss_mib")))
    L.append(row("cbatchd growth per running job, MiB", lambda m: (doc.get("daemon_growth_per_job_mib") or {}).get(m)))
    if top:
        L.append(row(f"start latency with {top} starting at once, ms", lambda m: (scal.get(m) or {}).get(top)))
    return "\n".join(L) + "\n"


if __name__ == "__main__":      # python -m bench.reportmd bench/results.json: the README table
    import sys
    with open(sys.argv[1]) as fh:
        print(readme_table(json.load(fh)), end="")
