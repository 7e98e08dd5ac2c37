"""``python -m bench [--quick] [--only NAME ...] [--engines docker direct] [--clients python c]``: run the
benchmarks, print each table, write the results (results.json, results.md, scaling.svg).

Run as root with the venv's interpreter (``scripts/bench`` does the set-up first). Default repetition
counts keep the whole suite near 30 minutes on a 2-core machine; ``--quick`` is a smoke run (a minute or
two, numbers not meaningful). A benchmark that fails is recorded under ``errors`` and the others still run.
Every cbatch mode (engine x client) asked for is measured where it is available; the others are reported as
``not available: <reason>`` (:mod:`bench.modes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench import clicalls, footprint, latency, modes, output, overhead, plot, report, reportmd, scaling, throughput
from bench.env import BENCH, C_CLIENT, Bench

# Six modes (three baselines, four cbatch modes when both engines and clients are there) and a 1..64 scaling
# curve: these counts keep a full run near 30 minutes on 2 cores.
FULL = {"latency_reps": 20, "throughput_jobs": 30, "footprint_jobs": 30, "footprint_docker_jobs": 10,
        "output_mib": 1024, "output_reps": 5, "output_docker_reps": 1, "spin_millions": 1200,
        "write_mib": 512, "overhead_reps": 5, "io_reps": 15, "cli_reps": 10, "scaling_top": 64}
QUICK = {"latency_reps": 2, "throughput_jobs": 4, "footprint_jobs": 4, "footprint_docker_jobs": 2,
         "output_mib": 64, "output_reps": 1, "output_docker_reps": 1, "spin_millions": 100,
         "write_mib": 32, "overhead_reps": 1, "io_reps": 1, "cli_reps": 2, "scaling_top": 4}
BENCHMARKS = {
    "latency": lambda b, s: latency.run(b, s["latency_reps"]),
    "throughput": lambda b, s: throughput.run(b, s["throughput_jobs"]),
    "footprint": lambda b, s: footprint.run(b, s["footprint_jobs"], s["footprint_docker_jobs"]),
    "output": lambda b, s: output.run(b, s["output_mib"], s["output_reps"], s["output_docker_reps"]),
    "overhead": lambda b, s: overhead.run(b, s["spin_millions"], s["write_mib"], s["overhead_reps"], s["io_reps"]),
    "clicalls": lambda b, s: clicalls.run(b, s["cli_reps"]),
    "scaling": lambda b, s: scaling.run(b, s["scaling_top"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not a measurement")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=N", help="override a count, e.g. "
                   "throughput_jobs=100")
    p.add_argument("--out", default=str(BENCH), help="directory for results.json, results.md, scaling.svg")
    p.add_argument("--engines", nargs="+", choices=modes.ENGINES, default=list(modes.ENGINES),
                   help="cbatch engines to measure (a queue each; default: both)")
    p.add_argument("--clients", nargs="+", choices=modes.CLIENTS, default=list(modes.CLIENTS),
                   help="hook and starter clients to measure (default: both)")
    p.add_argument("--c-client", default=C_CLIENT, help=f"the C client (default {C_CLIENT})")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it plays pbs_mom and starts cbatchd)", file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in settings:
            p.error(f"unknown setting {key}")
        settings[key] = int(value)
    started = time.time()
    results = {}
    bench = Bench(args.engines, args.clients, args.c_client)
    for name, why in bench.missing.items():
        print(f"bench: {name}: {why}", flush=True)
    try:
        for name in args.only or BENCHMARKS:
            t0 = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            try:
                results[name] = BENCHMARKS[name](bench, settings)
            except Exception as exc:  # noqa: BLE001 - record it, run the rest
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
            print(json.dumps(results[name], indent=1), flush=True)
    finally:
        bench.close()
    doc = report.headline(results, started, settings, [m.name for m in bench.modes], bench.missing, bench.cbatch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write(doc, out)
    (out / "scaling.svg").write_text(plot.svg(results.get("scaling") or {}))
    print(reportmd.markdown(doc))
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
