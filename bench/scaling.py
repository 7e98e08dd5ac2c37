"""Benchmark 7: start latency and cbatchd's CPU against the number of jobs starting at once (1..64).

For each level N and each mode (the mom-driven ones and ``runc``) N stamped jobs are started together (a
burst: all submitted at once, each measuring its own interval from the starter's exec to the script's first
instruction, as in :mod:`bench.latency`) and we wait for all of them to end. Per level and mode: the
latency summary over the N jobs, the burst's wall time (first submit to last end), and for cbatch modes
cbatchd's CPU per job during the burst (its utime + stime, including the children it reaped). Levels run
in order, modes round-robin inside a level. :mod:`bench.plot` draws the curve.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Sequence

from bench import jobs
from bench.runc import Bundle
from bench.stats import summary
from bench.throughput import daemon_cpu

LEVELS = (1, 2, 4, 8, 16, 32, 64)


def levels_up_to(top: int) -> List[int]:
    """The powers of two from 1 up to ``top`` (``top`` itself included when it is not one)."""
    out = [n for n in LEVELS if n <= top] or [1]
    if top > out[-1]:
        out.append(top)
    return out


def _burst_mom(mom, text: bytes, n: int) -> List[float]:
    started = [jobs.submit(mom, text) for _ in range(n)]
    out = []
    for job in started:
        result = job.wait(600)
        jobs.check(result)
        t = jobs.stamps(result.stdout)
        if len(t) != 2:
            raise jobs.JobFailed(f"expected 2 stamps, got {result.stdout[:200]!r}")
        out.append((t[1] - t[0]) * 1000)
    return out


def _burst_runc(bundle: Bundle, n: int) -> List[float]:
    out: List[float] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            seconds, _ = bundle.run()
            with lock:
                out.append(seconds * 1000)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def run(bench, top: int, levels: Sequence[int] = ()) -> dict:
    """The curve for levels 1, 2, 4, ... ``top``: ``{"levels", "latency_ms": {mode: {N: summary}},
    "burst_s": {mode: {N: s}}, "daemon_cpu_ms_per_job": {mode: {N: ms}}}`` (N as a string: JSON keys)."""
    levels = list(levels) or levels_up_to(top)
    text = jobs.script("stamp")
    names = list(bench.mode_names) + ["runc"]
    lat: Dict[str, dict] = {m: {} for m in names}
    burst: Dict[str, dict] = {m: {} for m in names}
    cpu: Dict[str, dict] = {m: {} for m in bench.cbatch_names()}
    bundle = Bundle(bench.run_dir / "scaling", bench.user, text)
    try:
        for n in levels:
            for mode in names:
                c0, t0 = daemon_cpu(bench.daemon.pid), time.monotonic()
                if mode == "runc":
                    values = _burst_runc(bundle, n)
                else:
                    values = _burst_mom(bench.mom(mode, stamped=True), text, n)
                elapsed, used = time.monotonic() - t0, daemon_cpu(bench.daemon.pid) - c0
                lat[mode][str(n)] = summary(values, 1)
                burst[mode][str(n)] = round(elapsed, 2)
                if mode in cpu:
                    cpu[mode][str(n)] = round(used / n * 1000, 1)
                print(f"  scaling {n} {mode}: median {lat[mode][str(n)]['median']} ms, burst {elapsed:.1f} s",
                      flush=True)
    finally:
        bundle.close()
    return {"levels": levels, "latency_ms": lat, "burst_s": burst, "daemon_cpu_ms_per_job": cpu}
