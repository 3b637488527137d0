"""What tracing costs: throughput of one `blink serve` with OpenTelemetry tracing on (OTLP/HTTP export to a local
receiver that decodes and drops what it gets) against one with it off, measured side by side.

Both servers run the default model with the semantic cache off; each round drives one of them with CONCURRENCY
streams of greedy chat completions (ignore_eos, max_tokens TOKENS) and counts output tokens per second of wall
time. Rounds alternate between the servers (off, on, off, on, ...) so drift in machine load hits both alike; the
first round of each is a warm-up.

  python -m benchmarks.tracing [--rounds 4] [--out benchmarks/results]    (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine, write_report
from tests.e2e.conftest import MODEL, Server
from tests.e2e.test_tracing import Receiver

CONCURRENCY = 4
TOKENS = 96
PROMPTS = [f"Tell me a story about a {thing}." for thing in ("lighthouse", "river", "fox", "clock", "garden", "ship")]


async def one_round(base: str) -> float:
    """Output tokens per second of CONCURRENCY streams run together."""

    async def stream(client: httpx.AsyncClient, prompt: str) -> int:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache": False,
            "ignore_eos": True,
        }
        tokens = 0
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
        return tokens

    async with httpx.AsyncClient(timeout=300) as client:
        started = time.monotonic()
        counts = await asyncio.gather(*(stream(client, PROMPTS[i % len(PROMPTS)]) for i in range(CONCURRENCY)))
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per server (after one warm-up)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    receiver = Receiver()
    logs = Path(tempfile.mkdtemp(prefix="blink-tracing-"))
    env_on = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    servers = {
        "off": Server(logs / "off.log", "--no-semantic-cache", env={"OTEL_TRACES_EXPORTER": "none"}),
        "on": Server(logs / "on.log", "--no-semantic-cache", env=env_on),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(args.rounds + 1):
            for name, server in servers.items():
                rate = asyncio.run(one_round(server.base))
                print(f"round {i} tracing {name}: {rate:.1f} tokens/s")
                if i:
                    rates[name].append(rate)
    finally:
        for server in servers.values():
            server.stop()
        receiver.server.shutdown()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    traces = len({s.trace_id for _, s in receiver.spans})
    data: dict[str, Any] = {"rates": rates, "spans": len(receiver.spans), "traces": traces}
    markdown = f"""# Tracing overhead: throughput with OpenTelemetry tracing on and off

{machine()}
Command: `python -m benchmarks.tracing --rounds {args.rounds}`

Two `blink serve` processes (semantic cache off), one with `OTEL_TRACES_EXPORTER=otlp` exporting to a local
OTLP/HTTP receiver, one with tracing off; rounds alternate between them, {CONCURRENCY} greedy streams of {TOKENS}
tokens per round, median of {args.rounds} rounds after a warm-up. The receiver got {len(receiver.spans)} spans in
{traces} traces.

| tracing | output tokens/s (median) | rounds |
|---|---|---|
| off | {off:.1f} | {", ".join(f"{r:.1f}" for r in rates["off"])} |
| on | {on:.1f} | {", ".join(f"{r:.1f}" for r in rates["on"])} |

Throughput with tracing on / off: **{on / off:.3f}** (target: over 0.98, i.e. under 2% lost).
"""
    write_report(args.out, "tracing", markdown, data)


if __name__ == "__main__":
    main()
