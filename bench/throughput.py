"""Benchmark 2: many-task throughput through the mom emulator.

``count`` trivial jobs (``echo hello``) per mode and concurrency (1, 2, 8 jobs in flight), each a complete
job as the mom runs it: for cbatch that is prologue (register), starter, container, exit, epilogue
(unregister, leftovers); for the baselines no cbatch hook at all. jobs/s = count / seconds from the first
submit to the last job's end. Modes alternate within each concurrency level.
"""

from __future__ import annotations

from bench import jobs

CONCURRENCY = (1, 2, 8)
MODES = ("native", "cbatch", "docker_run")


def run(bench, count: int) -> dict:
    """``{"count", "jobs_per_s": {"c1": {mode: jobs/s}}, "seconds": ..., "failed": ...}``."""
    text = jobs.script("trivial")
    for mode in MODES:      # warm-up: the first job of a mom pays for page cache and imports
        jobs.run_one(bench.mom(mode), text)
    rates, seconds, failed = {}, {}, {}
    for c in CONCURRENCY:
        key = f"c{c}"
        rates[key], seconds[key], failed[key] = {}, {}, {}
        for mode in MODES:
            elapsed, bad = jobs.run_many(bench.mom(mode), text, count, c)
            rates[key][mode] = round(count / elapsed, 2)
            seconds[key][mode] = round(elapsed, 2)
            failed[key][mode] = bad
            print(f"  throughput {key} {mode}: {rates[key][mode]} jobs/s ({bad} failed)", flush=True)
    return {"count": count, "jobs_per_s": rates, "seconds": seconds, "failed": failed}
