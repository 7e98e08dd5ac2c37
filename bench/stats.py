"""Summaries of repeated measurements: median with min and max, and ratios between medians."""

from __future__ import annotations

import statistics
from typing import Dict, Iterable, Optional


def summary(values: Iterable[float], digits: int = 3) -> Dict[str, object]:
    """``{"median", "min", "max", "n", "values"}`` (rounded; ``values`` in measurement order, to see drift or
    two modes); an empty list gives n = 0 and None."""
    raw = [float(v) for v in values]
    vals = sorted(raw)
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(statistics.median(vals), digits), "min": round(vals[0], digits),
            "max": round(vals[-1], digits), "n": len(vals), "values": [round(v, digits) for v in raw]}


def ratio(a: Optional[float], b: Optional[float], digits: int = 3) -> Optional[float]:
    """a / b rounded, or None when either is missing or b is zero."""
    if a is None or not b:
        return None
    return round(a / b, digits)


def fmt(s: Dict[str, float], unit: str = "") -> str:
    """``median (min–max) unit`` for a table cell."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:g} ({s['min']:g}–{s['max']:g}){(' ' + unit) if unit else ''}"
