"""`blink bench`: drive one server (or two, one after the other, with the same sessions) and write the report.

    open loop    sessions start at the arrival times (--rate's Poisson process, or the trace's timestamps),
                 however many are already in flight
    closed loop  --concurrency: that many users, each starting a new session as soon as its last one ended,
                 stage after stage of the ramp

Sessions start during --duration-s; the run then waits for those in flight (each bounded by
--request-timeout-s). Before the clock starts, --warmup short sessions run one at a time, unmeasured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from blink.bench import report
from blink.bench.clients import DRIVERS, Driver, Outcome, Result, Run, Target
from blink.bench.workload import Sessions, Stage, TraceRow, load_trace, open_loop, parse_ramp
from blink.config import BenchConfig

PROGRESS_PERIOD_S = 0.5
BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n}/{total} s{postfix}"  # tqdm adds ": " and ", "


class _Live:
    """What the progress bar shows while a run goes on."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.in_flight = 0

    def postfix(self) -> str:
        errors = sum(r.outcome is Outcome.ERROR for r in self.results)
        ttft = [t * 1000 for r in self.results if (t := r.ttft_s) is not None]
        p50 = report.percentile(ttft, 0.5)
        first = f" ttft p50 {p50:.0f} ms" if p50 is not None else ""
        return f"done {len(self.results)} live {self.in_flight} errors {errors}{first}"


def targets(cfg: BenchConfig) -> list[Target]:
    out = [Target(cfg.url, cfg.protocol, cfg.label or _host(cfg.url))]
    if cfg.url2:
        out.append(Target(cfg.url2, cfg.protocol2 or cfg.protocol, cfg.label2 or _host(cfg.url2)))
    if len(out) == 2 and out[0].label == out[1].label:
        out = [Target(t.url, t.protocol, f"{t.label} ({n})") for n, t in enumerate(out, 1)]
    return out


def _host(url: str) -> str:
    return urlsplit(url if "://" in url else f"http://{url}").netloc or url


def check(cfg: BenchConfig) -> None:
    """Raises ValueError for settings that cannot make a run."""
    if cfg.duration_s <= 0:
        raise ValueError("--duration-s must be positive")
    for name in ("interrupt_fraction", "document_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1]")
    if cfg.max_output_tokens < 1 or cfg.max_prompt_tokens < 1 or cfg.question_words < 1:
        raise ValueError("--max-output-tokens, --max-prompt-tokens and --question-words must be positive")
    if cfg.rate < 0 or cfg.time_scale <= 0 or cfg.typing_ms < 0 or cfg.request_timeout_s <= 0:
        raise ValueError("--rate, --typing-ms must not be negative; --time-scale, --request-timeout-s positive")
    if cfg.rate > 0 and cfg.concurrency:
        raise ValueError("--rate (open loop) and --concurrency (closed loop) exclude each other")


async def run_target(
    cfg: BenchConfig, target: Target, sessions: Sessions, arrivals: Sequence[float], stages: Sequence[Stage]
) -> Run:
    """Drives `target` with the open-loop `arrivals`, or the closed-loop `stages` when there are any. Raises
    ConnectionError when the server cannot be reached (or its documents not stored) before the clock starts."""
    driver = DRIVERS[target.protocol](target, cfg)
    live = _Live()
    load = os.getloadavg()
    try:
        await driver.prepare()
        for i in range(cfg.warmup):
            await driver.run(sessions.warmup(i), time.perf_counter())
        started = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        ticker = asyncio.create_task(_progress(cfg, target, live, t0) if cfg.progress else asyncio.sleep(0))
        try:
            if stages:
                await _closed_loop(driver, sessions, stages, t0, live)
            else:
                await _open_loop(driver, sessions, arrivals, t0, live)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        wall = max((r.end_s for r in live.results), default=time.perf_counter() - t0)
    finally:
        await driver.close()
    results = sorted(live.results, key=lambda r: r.start_s)
    return Run(target, results, wall, list(stages), None if stages else len(arrivals), started, load)


async def _open_loop(driver: Driver, sessions: Sessions, arrivals: Sequence[float], t0: float, live: _Live) -> None:
    async def one(index: int, at_s: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at_s - time.perf_counter()))
        live.in_flight += 1
        result = await driver.run(sessions.job(index, at_s), t0)
        live.in_flight -= 1
        live.results.append(result)

    await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))


async def _closed_loop(driver: Driver, sessions: Sessions, stages: Sequence[Stage], t0: float, live: _Live) -> None:
    counter = itertools.count()

    async def user(u: int) -> None:
        while True:
            now = time.perf_counter() - t0
            stage = next((s for s in stages if s.start_s <= now < s.end_s), None)
            if stage is None:  # past the last stage
                return
            if u >= stage.users:  # not one of this stage's users: wait for a stage that has this one
                later = next((s for s in stages if s.start_s > now and u < s.users), None)
                if later is None:
                    return
                await asyncio.sleep(later.start_s - now)
                continue
            live.in_flight += 1
            result = await driver.run(sessions.job(next(counter), now), t0, stage.users)
            live.in_flight -= 1
            live.results.append(result)

    await asyncio.gather(*(user(u) for u in range(max(s.users for s in stages))))


async def _progress(cfg: BenchConfig, target: Target, live: _Live, t0: float) -> None:
    total = round(cfg.duration_s)
    desc = f"{target.label} ({target.protocol})"
    draining = False
    with tqdm(total=total, desc=desc, file=sys.stderr, bar_format=BAR_FORMAT) as bar:
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg.duration_s and not draining:
                bar.set_description(f"{desc} draining")
                draining = True
            bar.n = min(total, int(elapsed))
            bar.set_postfix_str(live.postfix(), refresh=False)
            bar.refresh()
            await asyncio.sleep(PROGRESS_PERIOD_S)


def main(cfg: BenchConfig) -> int:
    """Runs the benchmark against each target, prints the table, writes NAME.md, NAME.html and NAME.json into
    --out. Returns 0; 2 for settings that cannot make a run; 1 when a target cannot be reached."""
    try:
        check(cfg)
        trace: list[TraceRow] = load_trace(Path(cfg.trace)) if cfg.trace else []
        stages = parse_ramp(cfg.concurrency, cfg.duration_s) if cfg.concurrency else []
    except (ValueError, OSError) as e:
        print(f"blink bench: {e}", file=sys.stderr)
        return 2
    arrivals = [] if stages else open_loop(cfg, trace)
    sessions = Sessions(cfg, trace)
    runs: list[Run] = []
    for target in targets(cfg):
        try:
            runs.append(asyncio.run(run_target(cfg, target, sessions, arrivals, stages)))
        except ConnectionError as e:
            print(f"blink bench: {target.label}: cannot run: {e}", file=sys.stderr)
            return 1
    summaries = [report.summarize(run) for run in runs]
    print(report.markdown_table(summaries))
    paths = report.write(Path(cfg.out), cfg.name, cfg, runs, summaries)
    print("report: " + ", ".join(str(p) for p in paths))
    return 0
