"""The engine's serving targets, measured through a real `blink serve` and streaming HTTP clients, in one run.

prefix:     TTFT of a request whose ~500-token prefix (a document + question) was served just before, vs the
            same kind of request with a prefix never seen (cold). Medians over rounds; target ratio <= 0.2.
chunked:    8 streams decoding; p99 inter-token latency while a 1,000-token prompt arrives vs without it.
            Target ratio <= 2.
throughput: aggregate output tokens/s with 8 concurrent streams vs one stream. Target ratio >= 3.
memory:     peak RSS of the server vs its peak RSS when ready (weights and the warm-up's full-budget step) plus
            --kv-cache-mb; the KV pool's pages become resident as blocks are first written, and the run fills it.

  python benchmarks/serving.py [--rounds 5] [--out benchmarks/results] [-- extra blink serve flags]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from benchmarks.common import machine, write_report
from tests.e2e.conftest import MODEL, Server

WORDS = [
    "river",
    "market",
    "bridge",
    "winter",
    "garden",
    "lantern",
    "harbour",
    "meadow",
    "copper",
    "signal",
    "orchard",
    "library",
    "canvas",
    "valley",
    "engine",
    "thunder",
    "marble",
    "pocket",
    "velvet",
    "candle",
    "forest",
    "planet",
    "silver",
    "basket",
    "rocket",
    "shadow",
    "island",
    "ladder",
]


def document(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream(
    client: httpx.AsyncClient, content: str, max_tokens: int, *, ignore_eos: bool = True
) -> tuple[float, list[float], int]:
    """One streamed chat completion: (TTFT s, arrival times of each content delta, completion tokens)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return stamps[0] - start, stamps, tokens


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


async def prefix_hit(client: httpx.AsyncClient, rounds: int) -> dict[str, float]:
    cold, warm = [], []
    for i in range(rounds):
        doc = document(1000 + i, 440)  # ~500 tokens with the chat template
        first, _, _ = await stream(client, f"{doc}\n\nWhich word comes first?", 4)
        second, _, _ = await stream(client, f"{doc}\n\nWhich word comes last?", 4)
        cold.append(first)
        warm.append(second)
    return {"cold_ttft_ms": statistics.median(cold) * 1000, "warm_ttft_ms": statistics.median(warm) * 1000}


async def decoding_streams(client: httpx.AsyncClient, arrival: bool, tokens: int) -> dict[str, float]:
    """8 streams of `tokens` tokens; with `arrival`, a 1,000-token prompt comes once they are all decoding.
    Inter-token latency is taken over the window the long prompt could touch (from its send to 2 s after its
    first token), or the same window of a run without it."""
    tasks = [asyncio.create_task(stream(client, f"Tell a long story number {i}.", tokens)) for i in range(8)]
    await asyncio.sleep(1.5)
    start = time.perf_counter()
    long_ttft = 0.0
    if arrival:
        long_ttft, _, _ = await stream(client, document(7, 900) + "\n\nSummarise.", 1)
    else:
        await asyncio.sleep(1.0)
    end = time.perf_counter() + 2.0
    results = await asyncio.gather(*tasks)
    window = [g for _, stamps, _ in results for a, g in zip(stamps, gaps(stamps), strict=False) if start <= a <= end]
    return {
        "itl_p50_ms": pct(window, 0.5) * 1000,
        "itl_p99_ms": pct(window, 0.99) * 1000,
        "long_ttft_ms": long_ttft * 1000,
    }


async def throughput(client: httpx.AsyncClient, concurrency: int, tokens: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(stream(client, f"Write an essay, part {i}.", tokens) for i in range(concurrency)))
    return sum(n for _, _, n in results) / (time.perf_counter() - start)


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(base: str, rounds: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        await stream(client, "Hi", 4)  # connection and first-request paths
        out: dict[str, Any] = {"prefix": await prefix_hit(client, rounds)}
        out["alone"] = await decoding_streams(client, False, 250)
        out["arrival"] = await decoding_streams(client, True, 250)
        out["tok_s_1"] = await throughput(client, 1, 128)
        out["tok_s_8"] = await throughput(client, 8, 128)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kv-cache-mb", type=int, default=256, help="small enough that the run fills it")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("flags", nargs="*", help="extra `blink serve` flags (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--kv-cache-mb", str(args.kv_cache_mb), *args.flags]
    server = Server(args.out / "serving-serve.log", *flags)
    try:
        server.wait_ready()
        ready_rss = rss_mb(server.proc.pid, "VmHWM")  # weights + the warm-up's largest step, before any traffic
        r = asyncio.run(measure(server.base, args.rounds))
        peak_rss = rss_mb(server.proc.pid, "VmHWM")
    finally:
        server.stop()
    p, alone, arrival = r["prefix"], r["alone"], r["arrival"]
    rows = [
        (
            "TTFT, ~500-token prefix cached vs cold (ms)",
            f"{p['warm_ttft_ms']:.0f} vs {p['cold_ttft_ms']:.0f}",
            p["warm_ttft_ms"] / p["cold_ttft_ms"],
            "<= 0.2",
        ),
        (
            "p99 inter-token latency of 8 streams, 1,000-token prompt arriving vs not (ms)",
            f"{arrival['itl_p99_ms']:.1f} vs {alone['itl_p99_ms']:.1f}",
            arrival["itl_p99_ms"] / alone["itl_p99_ms"],
            "<= 2",
        ),
        (
            "aggregate tokens/s, 8 streams vs 1",
            f"{r['tok_s_8']:.1f} vs {r['tok_s_1']:.1f}",
            r["tok_s_8"] / r["tok_s_1"],
            ">= 3",
        ),
        (
            "peak RSS vs peak RSS when ready + --kv-cache-mb (MiB)",
            f"{peak_rss:.0f} vs {ready_rss + args.kv_cache_mb:.0f}",
            peak_rss / (ready_rss + args.kv_cache_mb),
            "<= 1",
        ),
    ]
    lines = [
        "# Serving targets of the engine (one `blink serve`, streaming HTTP clients on 127.0.0.1)",
        "",
        machine(),
        f"Command: `python benchmarks/serving.py --rounds {args.rounds} --kv-cache-mb {args.kv_cache_mb}"
        + (f" -- {' '.join(args.flags)}`" if args.flags else "`"),
        "",
        "| measure | figures | ratio | target |",
        "|---|---|---|---|",
        *[f"| {name} | {fig} | {ratio:.2f} | {target} |" for name, fig, ratio, target in rows],
        "",
        f"8 streams alone: ITL p50 {alone['itl_p50_ms']:.1f} ms; with the arrival: p50 {arrival['itl_p50_ms']:.1f} ms,"
        f" the 1,000-token prompt's own TTFT {arrival['long_ttft_ms']:.0f} ms.",
    ]
    write_report(
        args.out, "serving", "\n".join(lines) + "\n", {**r, "ready_rss_mb": ready_rss, "peak_rss_mb": peak_rss}
    )


if __name__ == "__main__":
    main()
