from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from blink.bench import plots, report
from blink.bench.clients import Outcome, Result, Run, Target
from blink.bench.workload import Stage
from blink.config import BenchConfig


def result(
    job: int, ttft: float, gap: float, n: int, outcome: Outcome = Outcome.COMPLETED, start: float = 0.0
) -> Result:
    stamps = [ttft + i * gap for i in range(n)]
    return Result(
        job,
        start,
        submit_s=start + 0.5,
        stamps=stamps,
        outcome=outcome,
        output_tokens=n,
        prompt_tokens=100,
        cached_tokens=25,
    )


def test_percentile_interpolates() -> None:
    assert report.percentile([], 0.5) is None
    assert report.percentile([3.0], 0.99) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert report.percentile(list(range(101)), 0.95) == pytest.approx(95.0)
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0


def test_summary_counts_and_latencies() -> None:
    results = [
        result(0, 0.1, 0.02, 11),
        result(1, 0.2, 0.04, 11),
        result(2, 0.3, 0.02, 3, Outcome.INTERRUPTED),
        Result(3, 0.0, error="http: 429 overloaded"),
        Result(4, 0.0, error="timeout: no end within 120 s"),
        Result(5, 0.0, error="http: 503 model_not_ready"),
    ]
    s = report.summarize(Run(Target("http://a", "sse", "a"), results, wall_s=10.0))
    assert (s.sessions, s.completed, s.interrupted, s.errors) == (6, 2, 1, 3)
    assert s.error_kinds == {"http": 2, "timeout": 1}
    assert s.ttft_ms is not None and s.ttft_ms.p50 == pytest.approx(200.0)
    assert s.itl_ms is not None and s.itl_ms.p50 == pytest.approx(20.0) and s.itl_ms.p99 == pytest.approx(40.0)
    assert s.stream_tps is not None and s.stream_tps.p50 == pytest.approx(50.0)  # 10 tokens in 10 gaps of 20 ms
    assert s.output_tokens == 25 and s.output_tps == pytest.approx(2.5)
    assert s.prompt_tokens_mean == 100 and s.cached_share == pytest.approx(0.25)


def test_stages_split_the_sessions_by_start() -> None:
    results = [result(i, 0.1 * (1 + i // 2), 0.02, 5, start=float(i * 5)) for i in range(4)]
    run = Run(Target("http://a", "ws", "a"), results, 20.0, [Stage(1, 0, 10), Stage(4, 10, 20)])
    s = report.summarize(run)
    assert [(st.users, st.sessions) for st in s.stages] == [(1, 2), (4, 2)]
    assert s.stages[0].ttft_ms is not None and s.stages[0].ttft_ms.p50 == pytest.approx(100.0)
    assert s.stages[1].output_tps == pytest.approx(1.0)
    assert report.stage_rows(s)[1][:2] == ["1", "2"]


def test_table_has_the_ratio_second_over_first() -> None:
    a = report.summarize(Run(Target("http://a", "ws", "blink"), [result(0, 0.1, 0.02, 5)], 10.0))
    b = report.summarize(Run(Target("http://b", "sse", "peer"), [result(0, 0.3, 0.01, 5)], 10.0))
    rows = {r[0]: r[1:] for r in report.table_rows([a, b])}
    assert rows["metric"] == ["blink (ws)", "peer (sse)", "peer / blink"]
    assert rows["TTFT p50 (ms)"] == ["100", "300", "3.00x"]
    assert rows["inter-token latency p50 (ms)"] == ["20.0", "10.0", "0.50x"]
    assert rows["errors"] == ["0", "0", "-"]
    assert "| peer / blink |" in report.markdown_table([a, b])


def test_write_makes_the_three_files(tmp_path: Path) -> None:
    cfg = BenchConfig(duration_s=10.0)
    runs = [
        Run(
            Target("http://a", "ws", "blink"),
            [result(i, 0.1 + i / 100, 0.02, 6, start=i) for i in range(5)],
            10.0,
            planned=5,
        ),
        Run(
            Target("http://b", "sse", "peer"),
            [result(0, 0.2, 0.01, 6), Result(1, 1.0, error="http: 500 x")],
            10.0,
            planned=5,
        ),
    ]
    summaries = [report.summarize(r) for r in runs]
    paths = report.write(tmp_path / "out", "cmp", cfg, runs, summaries)
    assert [p.name for p in paths] == ["cmp.md", "cmp.html", "cmp.json"]
    md = paths[0].read_text()
    assert "Poisson arrivals at 1/s (5 sessions)" in md and "Errors of peer: http 1" in md
    page = paths[1].read_text()
    assert page.count("<svg") == 4 and "TTFT p99 (ms)" in page and "<script" not in page
    data = json.loads(paths[2].read_text())
    assert data["config"]["duration_s"] == 10.0 and len(data["targets"]) == 2
    assert data["targets"][0]["summary"]["completed"] == 5
    assert data["targets"][1]["results"][1]["outcome"] == "error"


def test_nice_ticks_and_cdf() -> None:
    assert plots.nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert plots.nice_ticks(0, 0.9) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = plots.nice_ticks(0, 1234)
    assert ticks[0] == 0 and ticks[-1] >= 1234 and 4 <= len(ticks) <= 8
    assert plots.nice_ticks(5, 5) == [5]
    assert plots.cdf([3.0, 1.0, 2.0]) == [(1.0, 1 / 3), (2.0, 2 / 3), (3.0, 1.0)]
    big = plots.cdf([float(i) for i in range(10_000)])
    assert len(big) <= plots.CDF_POINTS and big[-1] == (9999.0, 1.0)


def test_chart_draws_every_point_inside_the_plot() -> None:
    series = [plots.Series("a", [(0.0, 1.0), (10.0, 250.0)], "#000")]
    svg = plots.chart("t", "x", "y", series, vlines=[5.0])
    xs = [float(x) for x in re.findall(r'cx="([\d.]+)"', svg)]
    ys = [float(y) for y in re.findall(r'cy="([\d.]+)"', svg)]
    assert len(xs) == 2 and all(plots.LEFT <= x <= plots.WIDTH - plots.RIGHT for x in xs)
    assert all(plots.TOP <= y <= plots.HEIGHT - plots.BOTTOM for y in ys)
    assert "stroke-dasharray" in svg
