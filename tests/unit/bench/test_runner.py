"""The runner and `blink bench` against the scripted realtime server (no model): loops, stages, exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from blink.bench import runner
from blink.bench.clients import Outcome, Target
from blink.bench.workload import Sessions, parse_ramp
from blink.cli import main
from blink.config import BenchConfig
from tests.unit.bench.fakes import realtime, realtime_in_thread

CFG = BenchConfig(typing_ms=0.0, document_fraction=0.0, interrupt_fraction=0.0, warmup=1, progress=False)


def test_open_loop_runs_every_arrival() -> None:
    async def go() -> runner.Run:
        async with realtime("ok", []) as url:
            arrivals = [0.0, 0.05, 0.1, 0.1, 0.3]
            return await runner.run_target(CFG, Target(url, "ws", "fake"), Sessions(CFG), arrivals, [])

    run = asyncio.run(go())
    assert run.planned == 5 and len(run.results) == 5
    assert all(r.outcome is Outcome.COMPLETED and len(r.stamps) == 6 for r in run.results)
    assert sorted(r.job for r in run.results) == [0, 1, 2, 3, 4]
    assert run.results[-1].start_s == pytest.approx(0.3, abs=0.1)


def test_closed_loop_follows_the_ramp() -> None:
    cfg = dataclasses.replace(CFG, duration_s=1.0)
    stages = parse_ramp("1:0.5,3:0.5", cfg.duration_s)

    async def go() -> runner.Run:
        async with realtime("ok", []) as url:
            return await runner.run_target(cfg, Target(url, "ws", "fake"), Sessions(cfg), [], stages)

    run = asyncio.run(go())
    first = [r for r in run.results if r.start_s < 0.5]
    second = [r for r in run.results if r.start_s >= 0.5]
    assert first and second and {r.users for r in first} == {1} and {r.users for r in second} == {3}
    assert all(r.outcome is Outcome.COMPLETED for r in run.results)
    overlap = max(sum(1 for o in first if o.submit_s and o.submit_s < r.end_s and r.start_s < o.end_s) for r in first)
    assert overlap == 1  # one user: one session at a time
    assert len(second) / 0.5 > 1.5 * len(first) / 0.5  # three users start more sessions


def test_targets_get_labels() -> None:
    two = runner.targets(BenchConfig(url="http://a:1", url2="http://b:2/v1", protocol="sse"))
    assert [(t.label, t.protocol, t.base) for t in two] == [("a:1", "sse", "http://a:1"), ("b:2", "sse", "http://b:2")]
    same = runner.targets(BenchConfig(url="http://a:1", url2="http://a:1", protocol2="ws"))
    assert [t.label for t in same] == ["a:1 (1)", "a:1 (2)"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--duration-s", "0"],
        ["--interrupt-fraction", "2"],
        ["--rate", "1", "--concurrency", "2"],
        ["--concurrency", "x"],
    ],
)
def test_bad_settings_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *flags]) == 2
    assert "blink bench:" in capsys.readouterr().err


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--url", "http://127.0.0.1:9", "--duration-s", "1", "--out", str(tmp_path)]) == 1
    assert "cannot run" in capsys.readouterr().err


def test_cli_writes_a_side_by_side_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with realtime_in_thread() as url:
        argv = ["bench", "--url", url, "--url2", url, "--label", "one", "--label2", "two", "--rate", "10"]
        argv += ["--duration-s", "0.5", "--typing-ms", "0", "--document-fraction", "0", "--no-progress"]
        assert main([*argv, "--out", str(tmp_path), "--name", "cmp", "--interrupt-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| metric | one (ws) | two (ws) | two / one |" in out
    data = json.loads((tmp_path / "cmp.json").read_text())
    one, two = (t["summary"] for t in data["targets"])
    assert one["sessions"] == two["sessions"] > 0 and one["errors"] == two["errors"] == 0
    assert one["interrupted"] > 0 and one["completed"] > 0
    assert (tmp_path / "cmp.html").read_text().count("<svg") == 4
