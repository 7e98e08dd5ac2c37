"""Where the direct path's milliseconds go: cbatchd's ``CBATCH_TIMING=1`` log lines, parsed.

With ``CBATCH_TIMING=1`` (the bench daemon always has it) the direct engine logs one line per step of a
start, ``timing <step> <ms>`` (e.g. ``timing direct.rootfs 4.1``), anywhere in a log line (after the
logger's prefix). :func:`parse` collects them by step, :func:`breakdown` summarises them (median, min, max,
n per step, in the order the steps first appear) and adds ``_sum_of_steps`` (the sum of the steps' medians);
a step whose last name part is ``start`` or ``total`` is the whole call (the direct engine logs
``direct.start`` from the call's beginning), so it is left out of the sum and ``_unaccounted`` is its median
less the sum: time inside the call that no step covers. Hold these against the start latency measured from
outside. :func:`fallbacks` finds the jobs the engine router sent to Docker instead.
"""

from __future__ import annotations

import re
from typing import Dict, List

from bench.stats import summary

_LINE = re.compile(r"(?:^|\s)timing\s+([A-Za-z0-9_.:-]+)\s+(-?[0-9]+(?:\.[0-9]+)?)(?:\s*ms)?\s*$")


def parse(text: str) -> Dict[str, List[float]]:
    """``{step: [ms, ...]}`` from log text, steps in first-seen order; other lines are ignored."""
    out: Dict[str, List[float]] = {}
    for line in text.splitlines():
        m = _LINE.search(line.rstrip())
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


_FALLBACK = re.compile(r"engine docker instead of direct: (.*)$")


def fallbacks(text: str) -> List[str]:
    """The reasons of the router's "engine docker instead of direct" lines in log text: a direct-engine job
    that ran on Docker would make the direct mode's numbers the docker engine's."""
    return [m.group(1).strip() for m in map(_FALLBACK.search, text.splitlines()) if m]


TOTALS = ("start", "total")


def is_total(step: str) -> bool:
    """Whether ``step`` times the whole call rather than one part of it."""
    return step.rsplit(".", 1)[-1] in TOTALS


def breakdown(text: str) -> Dict[str, dict]:
    """Per-step summaries (ms) of the timing lines in ``text``, plus ``_sum_of_steps`` (and, with a total
    step, ``_unaccounted``) when there are any."""
    steps = {k: summary(v, 2) for k, v in parse(text).items()}
    parts = [v["median"] for k, v in steps.items() if not is_total(k)]
    totals = [v["median"] for k, v in steps.items() if is_total(k)]
    if parts:
        steps["_sum_of_steps"] = {"median": round(sum(parts), 2), "n": len(parts)}
    if parts and len(totals) == 1:
        steps["_unaccounted"] = {"median": round(totals[0] - sum(parts), 2), "n": 1}
    return steps
