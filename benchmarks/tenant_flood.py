"""One tenant floods, another asks once: does the second keep its first-token latency? Measured in one run.

A real `blink serve` with a keys file and two tenants at the default limits. Tenant B sends single streamed chat
requests (a ~100-token prompt, 8 tokens out), one at a time, and their time to first token is measured:
  idle:   nothing else runs (before the flood and after it, alternating blocks),
  flood:  tenant A holds as many streams as its limits allow (max_concurrent_responses streams of
          `ignore_eos` completions, each restarted as it ends) and types in as many realtime sessions as
          --typing-sessions (a draft every 1/drafts_per_second s each: pre-loads), while B asks.
The target (issue 17): B's median first token under flood within 1.5x of idle. Before the replica called A's
running step off for B (engine.interrupt_for), B waited for most of one of A's flood steps: 2.07x here.

  python -m benchmarks.tenant_flood [--rounds 3] [--asks 6] [--typing-sessions 4]    (from the repository root)
Writes benchmarks/results/tenant_flood.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from benchmarks.common import machine, write_report
from blink.config import TenantLimits
from blink.gateway.keys import KeyFile
from tests.e2e.conftest import MODEL, Server

RESULTS = Path(__file__).parent / "results"
QUESTION = (
    "Here are my notes from the planning meeting. We agreed to move the launch to the second week of the month, "
    "to hire two more support engineers, and to run a survey of the beta users before we change the pricing. "
    "Which of these should happen first, and why?"
)


async def ttft(client: httpx.AsyncClient, url: str, key: str, i: int) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{QUESTION} ({i})"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "cache": False,
    }
    started = time.perf_counter()
    first = 0.0
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not first and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
    return first


async def stream_forever(client: httpx.AsyncClient, url: str, key: str, stop: asyncio.Event) -> int:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 256, "ignore_eos": True, "stream": True}
    done = 0
    while not stop.is_set():
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
            if reply.status_code == 429:  # at its limit: wait for a slot, as a client honouring Retry-After
                await asyncio.sleep(0.2)
                continue
            async for _ in reply.aiter_lines():
                if stop.is_set():
                    break
        done += 1
    return done


async def type_forever(ws_url: str, key: str, per_second: float, stop: asyncio.Event) -> int:
    sent = 0
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as ws:
        words = QUESTION.split()
        while not stop.is_set():
            text = " ".join(words[: 1 + sent % len(words)]) + f" {sent}"
            await ws.send(json.dumps({"type": "input_text.draft", "text": text}))
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / per_second)
    return sent


async def run(server: Server, keys: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    url = f"{server.base}/v1/chat/completions"
    limits = TenantLimits()
    idle: list[float] = []
    flood: list[float] = []
    streams_done = drafts_sent = 0
    async with httpx.AsyncClient(timeout=300) as client:
        await ttft(client, url, keys["b"], -1)  # warm-up
        for r in range(args.rounds):
            idle += [await ttft(client, url, keys["b"], 1000 * r + i) for i in range(args.asks)]
            stop = asyncio.Event()
            streams = [
                asyncio.create_task(stream_forever(client, f"{server.base}/v1/completions", keys["a"], stop))
                for _ in range(limits.max_concurrent_responses)
            ]
            typing = [
                asyncio.create_task(type_forever(server.ws_url, keys["a"], limits.drafts_per_second, stop))
                for _ in range(args.typing_sessions)
            ]
            await asyncio.sleep(3.0)  # the flood reaches its steady state (every stream decoding)
            flood += [await ttft(client, url, keys["b"], 1000 * r + 500 + i) for i in range(args.asks)]
            stop.set()
            streams_done += sum(await asyncio.gather(*streams))
            drafts_sent += sum(await asyncio.gather(*typing))
            await asyncio.to_thread(server.wait_idle, 120)
    med_idle, med_flood = statistics.median(idle), statistics.median(flood)
    return {
        "idle_ms": [round(1000 * x, 1) for x in idle],
        "flood_ms": [round(1000 * x, 1) for x in flood],
        "median_idle_ms": round(1000 * med_idle, 1),
        "median_flood_ms": round(1000 * med_flood, 1),
        "ratio": round(med_flood / med_idle, 3),
        "flood_streams": limits.max_concurrent_responses,
        "typing_sessions": args.typing_sessions,
        "drafts_sent": drafts_sent,
        "streams_finished": streams_done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asks", type=int, default=6, help="B's requests per phase and round")
    parser.add_argument("--typing-sessions", type=int, default=4)
    parser.add_argument(
        "--serve-flags", default="", help="more `blink serve` flags, one string (e.g. '--speculative off')"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        file = KeyFile(Path(tmp) / "keys.json")
        keys = {"a": file.add("a")[1], "b": file.add("b")[1]}
        server = Server(Path(tmp) / "serve.log", "--api-keys", str(file.path), *args.serve_flags.split())
        try:
            server.wait_ready()
            result = asyncio.run(run(server, keys, args))
            result["interrupted_steps"] = sum(r["interrupted_steps"] for r in server.readyz()["replicas"])
        finally:
            server.stop()
    result["machine"] = machine()
    table = (
        "# One tenant floods, another asks: first-token latency\n\n"
        f"`python -m benchmarks.tenant_flood --rounds {args.rounds} --asks {args.asks} "
        f"--typing-sessions {args.typing_sessions}` on {result['machine']}\n\n"
        f"Tenant A: {result['flood_streams']} ignore_eos streams (its concurrency limit) and "
        f"{result['typing_sessions']} sessions typing at its draft rate ({result['drafts_sent']} drafts); tenant B: "
        "single streamed chat requests (~60-token prompt, 8 tokens).\n\n"
        "| B's first token | median |\n|---|---|\n"
        f"| idle server | {result['median_idle_ms']} ms |\n"
        f"| while A floods | {result['median_flood_ms']} ms |\n"
        f"| ratio (target <= 1.5) | {result['ratio']} |\n\n"
        f"Steps of A's called off for B's requests (engine.interrupt_for): {result['interrupted_steps']}; A's "
        f"streams finished meanwhile: {result['streams_finished']}.\n"
    )
    write_report(RESULTS, "tenant_flood", table, result)


if __name__ == "__main__":
    main()
