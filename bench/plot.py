"""``bench/scaling.svg``: the scaling curve drawn as plain SVG (no plotting library).

Two panels side by side: start latency (median ms, log scale) against the number of concurrent starts
(log2 scale), one line per mode; and cbatchd's CPU ms per job for the cbatch modes (linear scale). Points
with no value are skipped; a panel with no data says so. All text is escaped.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

W, H = 980, 440                 # whole picture
PANEL_W, PANEL_H = 380, 300     # plotting area of one panel
TOP, LEFT = 64, 70
GAP = 110                       # between the panels
COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
          "#1f78b4", "#b2182b")
Series = Dict[str, Dict[str, Optional[float]]]     # mode -> {level (str): value}


def _nice_log_ticks(lo: float, hi: float) -> List[float]:
    """Decade ticks (1, 10, 100, ...) covering lo..hi, with 2 and 5 when fewer than three decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if b - a < 3 else (1,)
    return [m * 10 ** e for e in range(a, b + 1) for m in steps if lo <= m * 10 ** e <= hi] or [lo, hi]


def _nice_lin_ticks(hi: float) -> List[float]:
    if hi <= 0:
        return [0.0]
    raw = hi / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step) + 2)]


def _fmt(v: float) -> str:
    return f"{v:g}" if v >= 1 else f"{v:.2g}"


def _panel(x0: int, title: str, ylabel: str, series: Series, levels: Sequence[int], log_y: bool,
           colors: Dict[str, str]) -> List[str]:
    out = [f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 18}" text-anchor="middle" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>']
    values = [v for s in series.values() for v in s.values() if v is not None and (v > 0 or not log_y)]
    if not values or not levels:
        out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H / 2}" text-anchor="middle">no data</text>')
        return out
    xs = [math.log2(n) for n in levels]
    x_lo, x_hi = min(xs), max(xs)

    def px(n: int) -> float:
        return x0 + (PANEL_W / 2 if x_hi == x_lo else (math.log2(n) - x_lo) / (x_hi - x_lo) * PANEL_W)

    if log_y:
        lo, hi = min(values), max(values)
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        hi = hi * 10 if hi == lo else hi
        ticks = _nice_log_ticks(lo, hi)

        def py(v: float) -> float:
            return TOP + PANEL_H - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * PANEL_H
    else:
        ticks = _nice_lin_ticks(max(values))
        top = ticks[-1] or 1.0

        def py(v: float) -> float:
            return TOP + PANEL_H - v / top * PANEL_H
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PANEL_W}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    for n in levels:
        x = px(n)
        out.append(f'<text x="{x:.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle" font-size="11">{n}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 36}" text-anchor="middle" font-size="12">'
               'jobs starting at once</text>')
    out.append(f'<text x="{x0 - 48}" y="{TOP + PANEL_H / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 {x0 - 48} {TOP + PANEL_H / 2})">{escape(ylabel)}</text>')
    for mode, points in series.items():
        pts = [(px(n), py(points[str(n)])) for n in levels
               if points.get(str(n)) is not None and (points[str(n)] > 0 or not log_y)]
        if not pts:
            continue
        color = colors[mode]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
    return out


def _medians(latency: Dict[str, Dict[str, dict]]) -> Series:
    return {m: {n: (s or {}).get("median") for n, s in by_n.items()} for m, by_n in latency.items()}


def svg(scaling: dict, title: str = "cbatch: start latency and daemon CPU against concurrent starts") -> str:
    """The SVG document for a :mod:`bench.scaling` result (``levels``, ``latency_ms``,
    ``daemon_cpu_ms_per_job``)."""
    levels = [int(n) for n in scaling.get("levels") or []]
    lat = _medians(scaling.get("latency_ms") or {})
    cpu: Series = scaling.get("daemon_cpu_ms_per_job") or {}
    names = list(lat) + [m for m in cpu if m not in lat]
    colors = {m: COLORS[i % len(COLORS)] for i, m in enumerate(names)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             'font-family="sans-serif" font-size="13">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15">{escape(title)}</text>']
    parts += _panel(LEFT, "start latency (median)", "ms (log scale)", lat, levels, True, colors)
    parts += _panel(LEFT + PANEL_W + GAP, "cbatchd CPU per job", "ms", cpu, levels, False, colors)
    ly = TOP + PANEL_H + 56
    x = LEFT
    for m in names:
        parts.append(f'<line x1="{x}" y1="{ly - 4}" x2="{x + 18}" y2="{ly - 4}" stroke="{colors[m]}" '
                     'stroke-width="3"/>')
        parts.append(f'<text x="{x + 22}" y="{ly}" font-size="12">{escape(m)}</text>')
        x += 30 + 8 * len(m)
        if x > W - 120:
            x, ly = LEFT, ly + 18
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def points(scaling: dict) -> Dict[str, List[Tuple[int, float]]]:
    """The (level, median ms) points the latency panel draws, per mode: for tests and the table."""
    levels = [int(n) for n in scaling.get("levels") or []]
    lat = _medians(scaling.get("latency_ms") or {})
    return {m: [(n, v[str(n)]) for n in levels if v.get(str(n)) is not None] for m, v in lat.items()}
