"""Benchmark 5: compute and I/O overhead inside a cbatch container vs natively, timed by the job itself.

CPU: ``benchtool spin`` (an integer hash loop: no memory traffic, no system calls), wall and CPU seconds.
I/O: ``benchtool write $HOME/...`` (1 MiB blocks, then fdatasync) into the home directory, which cbatch
bind-mounts. Modes alternate; ratios are cbatch's median time / native's (1.0 = no overhead, 1.01 = 1%
slower), also given for the best runs (``ratio_best``: noise only adds time) and, for the CPU kernel, for CPU
time. The container runs with cbatch's limits for a 1-CPU job without batch-system cgroups (``--cpus 1``).
"""

from __future__ import annotations

from bench import jobs
from bench.stats import ratio, summary

MODES = ("native", "cbatch")


def _series(bench, text: bytes, tag: str, reps: int) -> dict:
    times = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    for i in range(reps):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:     # alternate who goes first
            result, _ = jobs.run_one(bench.mom(mode), text, settle=True)
            fields = jobs.tagged(result.stdout, tag)
            if not fields:
                raise jobs.JobFailed(f"{mode}: no {tag} line in {result.stdout[:200]!r}")
            times[mode].append(float(fields[0][0]))
            if tag == "spin":
                cpu[mode].append(float(fields[0][1]))
    out = {"seconds": {m: summary(v, 4) for m, v in times.items()}}
    if tag == "spin":
        out["cpu_seconds"] = {m: summary(v, 4) for m, v in cpu.items()}
    out["ratio"] = ratio(out["seconds"]["cbatch"]["median"], out["seconds"]["native"]["median"], 4)
    # Noise from other work on the machine only ever adds time: the best runs compare the kernels alone.
    out["ratio_best"] = ratio(out["seconds"]["cbatch"]["min"], out["seconds"]["native"]["min"], 4)
    if tag == "spin":
        out["cpu_ratio"] = ratio(out["cpu_seconds"]["cbatch"]["median"], out["cpu_seconds"]["native"]["median"], 4)
    return out


def run(bench, spin_millions: int, write_mib: int, reps: int, io_reps: int = 0) -> dict:
    """The spin kernel ``reps`` times per mode, the write kernel ``io_reps`` times (default ``reps``): a write
    to the VM's disk varies ~10% run to run, a spin ~1%, so the I/O ratio needs more runs to mean anything."""
    cpu = _series(bench, jobs.script("spin", millions=spin_millions), "spin", reps)
    io = _series(bench, jobs.script("write", mib=write_mib), "write", io_reps or reps)
    cpu["millions"], io["mib"] = spin_millions, write_mib
    io["reps"] = io_reps or reps
    io["mib_per_s"] = {m: round(write_mib / s["median"], 1) for m, s in io["seconds"].items()}
    return {"reps": reps, "cbatch_mode": bench.cbatch, "cpu": cpu, "io": io}
