"""The HTML report's four plots, inline SVG (no script, no dependency): TTFT and inter-token latency over the run
(one dot per response; dashed lines between ramp stages) and their CDFs (one line per target). report.render puts
them in one self-contained page with the tables."""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from blink.bench.clients import Outcome, Run

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 44
CDF_POINTS = 400  # a CDF line is drawn through at most this many quantiles


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], about `count` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


def cdf(values: Sequence[float]) -> list[tuple[float, float]]:
    """(value, share of values <= it) at up to CDF_POINTS evenly spaced ranks."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return []
    ranks = range(n) if n <= CDF_POINTS else sorted({round(i * (n - 1) / (CDF_POINTS - 1)) for i in range(CDF_POINTS)})
    return [(ordered[i], (i + 1) / n) for i in ranks]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0e}"


def chart(
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[Series],
    *,
    lines: bool = False,
    vlines: Sequence[float] = (),
) -> str:
    """An SVG plot of `series`: dots, or (lines=True) a step line through each series' points in order."""
    xs = [x for s in series for x, _ in s.points] or [0.0, 1.0]
    ys = [y for s in series for _, y in s.points] or [0.0, 1.0]
    x_ticks = nice_ticks(min(0.0, min(xs)), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return TOP + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        f'font-size="11"><text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>'
    ]
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px(t):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_label(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{LEFT + pw}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>')
    out.append(
        f'<text transform="translate(14 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(y_label)}</text>'
    )
    for v in vlines:
        x = f"{px(v):.1f}"
        out.append(f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{TOP + ph}" stroke="#999" stroke-dasharray="4 3"/>')
    for s in series:
        if lines and s.points:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in _steps(s.points))
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.5"/>')
        else:
            out += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{s.color}" fill-opacity="0.6"/>'
                for x, y in s.points
            ]
    for i, s in enumerate(series):  # top right; a CDF's lines leave the bottom right free instead
        y = TOP + ph - 10 - 14 * (len(series) - 1 - i) if lines else TOP + 14 + 14 * i
        out.append(f'<rect x="{LEFT + pw - 150}" y="{y - 8}" width="10" height="10" fill="{s.color}"/>')
        out.append(f'<text x="{LEFT + pw - 136}" y="{y + 1}">{html.escape(s.name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _steps(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for x, y in points:
        if out:
            out.append((x, out[-1][1]))
        out.append((x, y))
    return out


def charts(runs: Sequence[Run]) -> list[str]:
    ttft, itl, ttft_cdf, itl_cdf = [], [], [], []
    for run, color in zip(runs, COLORS, strict=False):
        ok = [r for r in run.results if r.outcome is not Outcome.ERROR and r.submit_s is not None]
        name = f"{run.target.label} ({run.target.protocol})"
        ttft.append(Series(name, [(r.submit_s or 0.0, t * 1000) for r in ok if (t := r.ttft_s) is not None], color))
        gaps = [(r.submit_s or 0.0, statistics.median(r.gaps_s) * 1000) for r in ok if r.gaps_s]
        itl.append(Series(name, gaps, color))
        ttft_cdf.append(Series(name, cdf([t * 1000 for r in ok if (t := r.ttft_s) is not None]), color))
        itl_cdf.append(Series(name, cdf([g * 1000 for r in ok for g in r.gaps_s]), color))
    bounds = [s.start_s for s in runs[0].stages[1:]] if runs else []
    return [
        chart("Time to first token over the run", "submit time (s)", "TTFT (ms)", ttft, vlines=bounds),
        chart("Inter-token latency over the run", "submit time (s)", "response's median gap (ms)", itl, vlines=bounds),
        chart("CDF of time to first token", "TTFT (ms)", "share of responses", ttft_cdf, lines=True),
        chart("CDF of inter-token latency", "gap between deltas (ms)", "share of gaps", itl_cdf, lines=True),
    ]
