"""Benchmark 3: per-job memory of what cbatch keeps alive for the whole job, with many jobs running.

``jobs`` concurrent cbatch jobs per cbatch mode (engine and client) that print ``ready`` and sleep; once every
one is ready we read, for each job's starter (the process pbs_mom started: the session leader), VmRSS from
``/proc/<pid>/status`` and Pss from ``/proc/<pid>/smaps_rollup`` (PSS shares the interpreter's pages among the
starters), and cbatchd's own RSS/PSS at that load, just before the jobs (the growth per running job is the
difference over ``jobs``) and idle. The same for ``docker_jobs`` docker-run jobs, whose long-lived process is
the docker CLI. For context, the engine's per-container ``containerd-shim`` (docker engine and docker run; for
the direct engine its ``cbatch-shim``) is measured too, and an idle ``python -I`` (with and without ``site``)
as the floor under any Python starter. Then every job is qdel'ed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from bench import jobs
from bench.stats import summary

MIB = 1024 * 1024


def memory(pid: int) -> Optional[Dict[str, float]]:
    """``{"rss", "pss"}`` in MiB for a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            pss = next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return None
    return {"rss": rss / 1024, "pss": pss / 1024}


def shim_pids(cids: List[str]) -> List[int]:
    """The containerd-shim process of each container id (matched on its ``-id <cid>`` argument)."""
    want, found = set(cids), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and b"-id" in argv:
            i = argv.index(b"-id")
            if i + 1 < len(argv) and argv[i + 1].decode() in want:
                found.append(int(name))
    return found


def job_shim_pids(job_ids: List[str]) -> List[int]:
    """The direct engine's per-container ``cbatch-shim`` of each job (its command line names the job's
    container, :func:`cbatch.core.policy.container_name`, or the job id)."""
    from cbatch.core.policy import container_name
    needles = [n.encode() for j in job_ids for n in (container_name(j), j)]
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm", "rb") as fh:
                if fh.read().strip() != b"cbatch-shim":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(int(name))
    return found


def _docker_run_ids() -> List[str]:
    out = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", "label=cbatch-bench=1"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _load(bench, mode: str, n: int, containers) -> dict:
    """Start n sleeping jobs, measure their long-lived processes and shims, then qdel them all."""
    text = jobs.script("sleep", seconds=900)
    mom = bench.mom(mode)
    before = memory(bench.daemon.pid) or {}
    started = [jobs.submit(mom, text) for _ in range(n)]
    t0 = time.monotonic()
    try:
        for job in started:
            if not job.wait_output(b"ready", timeout=max(5.0, 300 - (time.monotonic() - t0))):
                raise jobs.JobFailed(f"{mode} job {job.job_id} not ready: {job.peek()[1][-500:]!r}")
        time.sleep(1.0)
        procs = [m for m in (memory(job.session_id) for job in started) if m]
        pids = shim_pids(containers()) + job_shim_pids([job.job_id for job in started])
        shims = [m for m in (memory(p) for p in pids) if m]
        out = {"jobs": n, "ready_after_s": round(time.monotonic() - t0, 1),
               "rss_mib": summary([m["rss"] for m in procs], 2), "pss_mib": summary([m["pss"] for m in procs], 2),
               "shim_rss_mib": summary([m["rss"] for m in shims], 2),
               "shim_pss_mib": summary([m["pss"] for m in shims], 2)}
        if mode != "docker_run":
            # cbatchd's growth per running job: its RSS with the n jobs running less its RSS just before.
            loaded = memory(bench.daemon.pid) or {}
            out["daemon_before"] = {k: round(v, 2) for k, v in before.items()}
            out["daemon"] = {k: round(v, 2) for k, v in loaded.items()}
            if loaded and before:
                out["daemon_growth_per_job_mib"] = round((loaded["rss"] - before["rss"]) / n, 3)
        return out
    finally:
        for job in started:
            job.qdel()
        for job in started:
            job.wait(120)


def python_floor() -> dict:
    """RSS/PSS of an idle ``python -I`` and ``python -I -S`` (no site) of the same interpreter: the floor
    under any Python job starter."""
    out = {}
    for name, flags in (("python_I", ["-I"]), ("python_IS", ["-I", "-S"])):
        proc = subprocess.Popen([sys.executable, *flags, "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE)
        time.sleep(0.5)
        out[name] = {k: round(v, 2) for k, v in (memory(proc.pid) or {}).items()}
        proc.stdin.close()
        proc.wait()
    return out


def run(bench, n_jobs: int, n_docker: int) -> dict:
    """Footprint of n_jobs jobs per cbatch mode and n_docker docker-run jobs (MiB summaries)."""
    floor = python_floor()
    idle = memory(bench.daemon.pid)
    modes = {}
    for mode in bench.cbatch_names():
        modes[mode] = _load(bench, mode, n_jobs, bench.cbatch_containers)
        modes[mode]["daemon_idle"] = {k: round(v, 2) for k, v in (idle or {}).items()}
    dr = _load(bench, "docker_run", n_docker, _docker_run_ids)
    return {"cbatch_modes": modes, "docker_run": dr, "python_floor": floor}
