"""The figures of a run and the report files: NAME.md (the table), NAME.html (the table and the plots, one
self-contained file) and NAME.json (the settings, the figures and every session's raw timings).

    TTFT          the user's submit (response.create sent / the request sent) to the first text delta
    ITL           the gaps between text deltas of one response (all responses pooled)
    tokens/s      per stream: (output tokens - 1) / (last delta - first delta); all streams: output tokens of
                  every session / the run's wall time
    interrupted   sessions whose user cancelled the answer midway, as planned (their TTFT and ITL count)
    errors        error events, HTTP errors, dropped connections, timeouts (counted by kind)

Percentiles interpolate linearly between order statistics; with a few dozen samples p99 is near the maximum.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import platform
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blink.bench.clients import Outcome, Result, Run
from blink.bench.plots import charts
from blink.config import BenchConfig


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1), linear between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Pcts:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Pcts | None:
        if not values:
            return None
        return cls(*(percentile(values, q) or 0.0 for q in (0.5, 0.95, 0.99)))


@dataclass(frozen=True)
class StageSummary:
    users: int
    sessions: int
    ttft_ms: Pcts | None
    itl_ms: Pcts | None
    output_tps: float  # output tokens of the sessions started in the stage / its length


@dataclass(frozen=True)
class Summary:
    label: str
    protocol: str
    url: str
    sessions: int
    completed: int
    interrupted: int
    errors: int
    error_kinds: dict[str, int]
    ttft_ms: Pcts | None
    itl_ms: Pcts | None
    stream_tps: Pcts | None  # per stream
    output_tps: float  # all streams together
    output_tokens: int
    prompt_tokens_mean: float | None
    cached_share: float | None  # cached prompt tokens / prompt tokens, where the server says
    wall_s: float
    stages: tuple[StageSummary, ...] = ()


def _latencies(results: Sequence[Result]) -> tuple[Pcts | None, Pcts | None]:
    ttft = [t * 1000 for r in results if (t := r.ttft_s) is not None and r.outcome is not Outcome.ERROR]
    gaps = [g * 1000 for r in results if r.outcome is not Outcome.ERROR for g in r.gaps_s]
    return Pcts.of(ttft), Pcts.of(gaps)


def summarize(run: Run) -> Summary:
    results = run.results
    ok = [r for r in results if r.outcome is not Outcome.ERROR]
    ttft, itl = _latencies(results)
    prompts = [r for r in ok if r.prompt_tokens is not None]
    cached = [r for r in prompts if r.cached_tokens is not None]
    prompt_sum = sum(r.prompt_tokens or 0 for r in cached)
    stages = []
    for stage in run.stages:
        inside = [r for r in results if stage.start_s <= r.start_s < stage.end_s]
        s_ttft, s_itl = _latencies(inside)
        tokens = sum(r.output_tokens for r in inside if r.outcome is not Outcome.ERROR)
        stages.append(StageSummary(stage.users, len(inside), s_ttft, s_itl, tokens / (stage.end_s - stage.start_s)))
    output_tokens = sum(r.output_tokens for r in ok)
    return Summary(
        label=run.target.label,
        protocol=run.target.protocol,
        url=run.target.url,
        sessions=len(results),
        completed=sum(r.outcome is Outcome.COMPLETED for r in results),
        interrupted=sum(r.outcome is Outcome.INTERRUPTED for r in results),
        errors=len(results) - len(ok),
        error_kinds=dict(Counter((r.error or "?").split(":")[0] for r in results if r.outcome is Outcome.ERROR)),
        ttft_ms=ttft,
        itl_ms=itl,
        stream_tps=Pcts.of([tps for r in ok if (tps := r.decode_tps) is not None]),
        output_tps=output_tokens / run.wall_s if run.wall_s > 0 else 0.0,
        output_tokens=output_tokens,
        prompt_tokens_mean=sum(r.prompt_tokens or 0 for r in prompts) / len(prompts) if prompts else None,
        cached_share=sum(r.cached_tokens or 0 for r in cached) / prompt_sum if prompt_sum else None,
        wall_s=run.wall_s,
        stages=tuple(stages),
    )


def _pct(attr: str, q: str) -> Callable[[Summary], float | None]:
    def get(s: Summary) -> float | None:
        p: Pcts | None = getattr(s, attr)
        return getattr(p, q) if p is not None else None

    return get


# (metric, value, format): the rows of the table; ratios are second / first
ROWS: tuple[tuple[str, Callable[[Summary], float | None], str], ...] = (
    ("sessions", lambda s: s.sessions, "{:.0f}"),
    ("completed", lambda s: s.completed, "{:.0f}"),
    ("interrupted (by the user, as planned)", lambda s: s.interrupted, "{:.0f}"),
    ("errors", lambda s: s.errors, "{:.0f}"),
    ("TTFT p50 (ms)", _pct("ttft_ms", "p50"), "{:.0f}"),
    ("TTFT p95 (ms)", _pct("ttft_ms", "p95"), "{:.0f}"),
    ("TTFT p99 (ms)", _pct("ttft_ms", "p99"), "{:.0f}"),
    ("inter-token latency p50 (ms)", _pct("itl_ms", "p50"), "{:.1f}"),
    ("inter-token latency p95 (ms)", _pct("itl_ms", "p95"), "{:.1f}"),
    ("inter-token latency p99 (ms)", _pct("itl_ms", "p99"), "{:.1f}"),
    ("tokens/s per stream, p50", _pct("stream_tps", "p50"), "{:.1f}"),
    ("output tokens/s, all streams", lambda s: s.output_tps, "{:.1f}"),
    ("output tokens", lambda s: s.output_tokens, "{:.0f}"),
    ("prompt tokens per request, mean", lambda s: s.prompt_tokens_mean, "{:.0f}"),
    (
        "prompt tokens from the prefix cache (%)",
        lambda s: None if s.cached_share is None else 100 * s.cached_share,
        "{:.0f}",
    ),
    ("wall time (s)", lambda s: s.wall_s, "{:.1f}"),
)


def table_rows(summaries: Sequence[Summary]) -> list[list[str]]:
    """Header row, then one row per metric: the value for each summary, and with two the ratio second / first."""
    header = ["metric", *(f"{s.label} ({s.protocol})" for s in summaries)]
    if len(summaries) == 2:
        header.append(f"{summaries[1].label} / {summaries[0].label}")
    rows = [header]
    for name, get, fmt in ROWS:
        values = [get(s) for s in summaries]
        row = [name, *("-" if v is None else fmt.format(v) for v in values)]
        if len(values) == 2:
            a, b = values
            row.append(f"{b / a:.2f}x" if a and b is not None else "-")
        rows.append(row)
    return rows


def stage_rows(summary: Summary) -> list[list[str]]:
    rows = [["users", "sessions", "TTFT p50 / p95 (ms)", "ITL p50 / p95 (ms)", "output tokens/s"]]
    for st in summary.stages:
        ttft = f"{st.ttft_ms.p50:.0f} / {st.ttft_ms.p95:.0f}" if st.ttft_ms else "-"
        itl = f"{st.itl_ms.p50:.1f} / {st.itl_ms.p95:.1f}" if st.itl_ms else "-"
        rows.append([str(st.users), str(st.sessions), ttft, itl, f"{st.output_tps:.1f}"])
    return rows


def _md(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def markdown_table(summaries: Sequence[Summary]) -> str:
    return _md(table_rows(summaries))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def describe(cfg: BenchConfig, runs: Sequence[Run]) -> list[str]:
    """Lines saying what load was offered, for the head of the reports."""
    run = runs[0]
    if run.stages:
        load = "closed loop, users per stage: " + ", ".join(
            f"{s.users} for {s.end_s - s.start_s:.0f} s" for s in run.stages
        )
    elif cfg.trace and cfg.rate <= 0:
        load = f"open loop, arrivals from the trace {cfg.trace} at {cfg.time_scale:g}x, from {cfg.trace_start_s:g} s"
    else:
        load = f"open loop, Poisson arrivals at {cfg.rate or 1.0:g}/s"
    if run.planned is not None:
        load += f" ({run.planned} sessions)"
    lengths = f"lengths from {cfg.trace}" if cfg.trace else "synthetic lengths"
    return [
        f"Load: {load}; {cfg.duration_s:g} s; {lengths}, prompts up to {cfg.max_prompt_tokens} words, answers up "
        f"to {cfg.max_output_tokens} tokens; seed {cfg.seed}.",
        f"Users: type {cfg.question_words} words {cfg.typing_ms:g} ms apart, then submit; "
        f"{cfg.interrupt_fraction:.0%} interrupt the answer midway; {cfg.document_fraction:.0%} open a document "
        f"(ws only); temperature {cfg.temperature:g}; ignore_eos {cfg.ignore_eos} (sse only); "
        f"server semantic cache {'allowed' if cfg.server_cache else 'off'}.",
        "Targets: " + "; ".join(f"{r.target.label} = {r.target.protocol} {r.target.url}" for r in runs) + ".",
        f"Machine: {machine()}. Started {run.started}. Load average before each target: "
        + "; ".join(f"{r.target.label} " + ", ".join(f"{x:.2f}" for x in r.load) for r in runs)
        + ".",
    ]


def write(out: Path, name: str, cfg: BenchConfig, runs: Sequence[Run], summaries: Sequence[Summary]) -> list[Path]:
    """Writes NAME.md, NAME.html and NAME.json into `out` (made if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    head = describe(cfg, runs)
    md = [f"# blink bench: {' vs '.join(s.label for s in summaries)}", "", *head, "", markdown_table(summaries)]
    for s in summaries:
        if s.error_kinds:
            md += ["", f"Errors of {s.label}: " + ", ".join(f"{k} {n}" for k, n in sorted(s.error_kinds.items()))]
        if s.stages:
            md += ["", f"Stages of {s.label}:", "", _md(stage_rows(s))]
    md += ["", f"Plots: {name}.html. Raw timings: {name}.json.", ""]
    paths = [out / f"{name}.md", out / f"{name}.html", out / f"{name}.json"]
    paths[0].write_text("\n".join(md))
    paths[1].write_text(render(head, runs, summaries))
    paths[2].write_text(json.dumps(to_json(cfg, runs, summaries), indent=1))
    return paths


def to_json(cfg: BenchConfig, runs: Sequence[Run], summaries: Sequence[Summary]) -> dict[str, Any]:
    def raw(r: Result) -> dict[str, Any]:
        out = dataclasses.asdict(r)
        out["stamps"] = [round(t, 5) for t in r.stamps]
        out["outcome"] = r.outcome.value
        return out

    return {
        "config": dataclasses.asdict(cfg),
        "machine": machine(),
        "targets": [
            {
                "summary": dataclasses.asdict(s),
                "started": run.started,
                "load_average": run.load,
                "results": [raw(r) for r in run.results],
            }
            for run, s in zip(runs, summaries, strict=True)
        ],
    }


def render(head: Sequence[str], runs: Sequence[Run], summaries: Sequence[Summary]) -> str:
    def table(rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><tr>{th}</tr>{body}</table>"

    title = "blink bench: " + " vs ".join(s.label for s in summaries)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:24px;max-width:1320px}}"
        "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}svg{margin:4px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(line)}</p>" for line in head),
        table(table_rows(summaries)),
    ]
    for s in summaries:
        if s.error_kinds:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.error_kinds.items()))
            parts.append(f"<p>Errors of {html.escape(s.label)}: {html.escape(kinds)}</p>")
        if s.stages:
            parts += [f"<h3>Stages of {html.escape(s.label)}</h3>", table(stage_rows(s))]
    parts += ["<div>", *charts(runs), "</div></body></html>"]
    return "\n".join(parts)
