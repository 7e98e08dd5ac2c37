"""Benchmark 4: the output path. The job writes ``mib`` MiB to its stdout (``benchtool out``: 1 MiB
``write(2)`` calls, timed by the writer itself, reported on stderr); stdout is the job's spool file.

native: the shell's stdout is the spool file. cbatch: the same file, bind-mounted into the container and
opened O_APPEND by cbatch-exec (no proxy). docker_run (for reference): the bytes travel through the engine's
attach stream to the docker CLI, which writes the spool file; there the writer's own time understates the
cost, so the job's wall time is reported as well. MiB/s = mib / writer's seconds.
"""

from __future__ import annotations

from bench import jobs
from bench.stats import ratio, summary


def run(bench, mib: int, reps: int, docker_reps: int) -> dict:
    text = jobs.script("out", mib=mib)
    plan = [("native", reps), ("cbatch", reps), ("docker_run", docker_reps)]
    rate = {m: [] for m, _ in plan}
    wall = {m: [] for m, _ in plan}
    for i in range(max(reps, docker_reps)):
        for mode, n in plan if i % 2 == 0 else plan[::-1]:     # alternate who goes first
            if i >= n:
                continue
            result, elapsed = jobs.run_one(bench.mom(mode), text, settle=True)
            got = len(result.stdout)
            fields = jobs.tagged(result.stderr, "out")
            del result
            if got != mib * 1024 * 1024 or not fields:
                raise jobs.JobFailed(f"{mode}: {got} bytes of output, expected {mib} MiB")
            rate[mode].append(mib / float(fields[0][0]))
            wall[mode].append(mib / elapsed)
    writer = {m: summary(v, 1) for m, v in rate.items()}
    return {"mib": mib, "cbatch_mode": bench.cbatch, "reps": {m: n for m, n in plan},
            "writer_mib_per_s": writer,
            "ratio": ratio(writer["cbatch"]["median"], writer["native"]["median"]),
            # Contention (other work, write-back) only ever slows a run: the best runs compare the paths.
            "ratio_best": ratio(writer["cbatch"]["max"], writer["native"]["max"]),
            "job_wall_mib_per_s": {m: summary(v, 1) for m, v in wall.items()}}
