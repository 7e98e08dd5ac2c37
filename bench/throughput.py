"""Benchmark 2: many-task throughput through the mom emulator.

``count`` trivial jobs (``echo hello``) per mode and concurrency (1, 2, 8 jobs in flight), each a complete
job as the mom runs it: for cbatch that is prologue (register), starter, container, exit, epilogue
(unregister, leftovers); for the baselines no cbatch hook at all. jobs/s = count / seconds from the first
submit to the last job's end. Modes alternate within each concurrency level. ``cpu_ms_per_job`` says where
the CPU went per job in each cell (:class:`CpuMeter`): once the cores are full, that limits throughput.
"""

from __future__ import annotations

import os
import resource
from typing import Dict, List, Optional

from bench import jobs

TICK = os.sysconf("SC_CLK_TCK")
ENGINE_PROCS = ("dockerd", "containerd")


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def process_cpu(pid: int) -> float:
    """CPU seconds of one process and of the children it reaped (utime, stime, cutime, cstime; 0 if gone):
    cbatchd's path-resolving forks count as cbatchd's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(b")") + 2:].split()
    return sum(int(f) for f in fields[11:15]) / TICK


def find_pids(names) -> Dict[str, int]:
    """The pid of each named process (by /proc/<pid>/comm), when running."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                continue
            if comm in names and comm not in found:
                found[comm] = int(entry)
    return found


def fork_servers(daemon_pid: int) -> List[int]:
    """cbatchd's fork server (cbatch.host.forkserver), a child named ``cbatchd-fork``: [pid] or []."""
    try:
        with open(f"/proc/{daemon_pid}/task/{daemon_pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    found = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as fh:
                if fh.read().strip() == "cbatchd-fork":
                    found.append(kid)
        except OSError:
            pass
    return found


def daemon_cpu(daemon_pid: int) -> float:
    """:func:`process_cpu` of cbatchd and of its fork server."""
    return sum(process_cpu(pid) for pid in [daemon_pid] + fork_servers(daemon_pid))


class CpuMeter:
    """CPU seconds spent, between :meth:`start` and :meth:`stop`, by: the whole machine; the mom's children
    (the job side: mom child, hooks, starter, shell, docker CLI - RUSAGE_CHILDREN of this process, which
    reaps them all); cbatchd; dockerd; containerd. The remainder is everything else (containerd-shims,
    runc, the kernel's work for them, and other users of the machine)."""

    def __init__(self, daemon_pid: Optional[int]):
        self.pids = {name: [pid] for name, pid in find_pids(ENGINE_PROCS).items()}
        if daemon_pid:
            # cbatchd's fork server (its children acting as a user) is cbatchd's too: it outlives the meter,
            # so its CPU never reaches cbatchd's cutime while we measure.
            self.pids["cbatchd"] = [daemon_pid] + fork_servers(daemon_pid)

    def _read(self) -> Dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"machine": cpu_seconds(), "job_processes": ru.ru_utime + ru.ru_stime}
        out.update({name: sum(process_cpu(pid) for pid in pids) for name, pids in self.pids.items()})
        return out

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self, per: int) -> Dict[str, float]:
        """ms per job for each part, and ``other`` = machine minus the parts."""
        t1 = self._read()
        ms = {k: (t1[k] - self.t0[k]) / per * 1000 for k in t1}
        ms["other"] = ms["machine"] - sum(v for k, v in ms.items() if k != "machine")
        return {k: round(v, 1) for k, v in ms.items()}

CONCURRENCY = (1, 2, 8)


def run(bench, count: int) -> dict:
    """``{"count", "jobs_per_s": {"c1": {mode: jobs/s}}, "seconds": ..., "failed": ...}``."""
    text = jobs.script("trivial")
    MODES = bench.mode_names
    for mode in MODES:      # warm-up: the first job of a mom pays for page cache and imports
        jobs.run_one(bench.mom(mode), text)
    rates, seconds, failed, cpu = {}, {}, {}, {}
    meter = CpuMeter(bench.daemon.pid)
    for c in CONCURRENCY:
        key = f"c{c}"
        rates[key], seconds[key], failed[key], cpu[key] = {}, {}, {}, {}
        for mode in MODES:
            meter.start()
            elapsed, bad = jobs.run_many(bench.mom(mode), text, count, c)
            cpu[key][mode] = meter.stop(count)
            rates[key][mode] = round(count / elapsed, 2)
            seconds[key][mode] = round(elapsed, 2)
            failed[key][mode] = bad
            print(f"  throughput {key} {mode}: {rates[key][mode]} jobs/s, CPU ms/job {cpu[key][mode]} "
                  f"({bad} failed)", flush=True)
    return {"count": count, "jobs_per_s": rates, "seconds": seconds, "failed": failed, "cpu_ms_per_job": cpu}
