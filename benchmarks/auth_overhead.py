"""What API keys and per-tenant limits add to a request's first-token latency, measured side by side in one run.

in process:   KeyFile.authenticate (one stat of the keys file, a SHA-256, a constant-time compare) plus
              Limiter.admit and Admission.done, per request (the work the middleware and the gateway add).
end to end:   two live gateways in this process (uvicorn on 127.0.0.1, as `blink serve` configures it), one open
              and one with a keys file (limits checked on every request, set high enough never to refuse), each
              with an instant scripted replica on the memory bus;
              streamed chat completions alternate between them, and the time from sending the request to the
              first content chunk is compared. The difference of medians is the overhead (the model's time is
              the same either way and is left out, so the ratio is the gateway's alone).

  python -m benchmarks.auth_overhead [--requests 400] [--calls 20000]    (from the repository root)
Writes benchmarks/results/auth_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_report
from blink.config import GatewayConfig
from blink.gateway.keys import KeyFile
from blink.gateway.limits import Limiter
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer

RESULTS = Path(__file__).parent / "results"
# every limit is checked on every request, none is reached (a refusal would end the measurement)
NEVER_REACHED = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent_responses": 1000}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}


def in_process(calls: int, folder: Path) -> dict[str, float]:
    keys = KeyFile(folder / "micro.json")
    key = keys.add("acme", limits=NEVER_REACHED)[1]
    for i in range(50):  # a realistic file: many keys and tenants
        keys.add(f"tenant{i}")
    keys = KeyFile(folder / "micro.json")
    limiter = Limiter()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        tenant = keys.authenticate(key)
        limiter.admit(tenant).done(100)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {"median_us": 1e6 * statistics.median(samples), "p99_us": 1e6 * samples[int(0.99 * len(samples))]}


def first_chunk_s(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    with client.stream("POST", url, json=BODY, headers=headers) as reply:
        assert reply.status_code == 200, reply.read()
        elapsed = 0.0
        for line in reply.iter_lines():  # read to the end: the stream's closing events included
            if not elapsed and '"content":"Hello"' in line:
                elapsed = time.perf_counter() - started
    assert elapsed, "no content chunk"
    return elapsed


def end_to_end(requests: int, folder: Path) -> dict[str, float]:
    path = folder / "keys.json"
    key = KeyFile(path).add("acme", limits=NEVER_REACHED)[1]
    servers = {
        "open": LiveServer([FakeReplica(MODEL)], GatewayConfig(port=0)),
        "keys": LiveServer([FakeReplica(MODEL)], GatewayConfig(port=0, api_keys=str(path))),
    }
    headers = {"open": {}, "keys": {"Authorization": f"Bearer {key}"}}
    times: dict[str, list[float]] = {"open": [], "keys": []}
    for server in servers.values():
        server.start()
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(requests + 20):
                order = ("open", "keys") if i % 2 else ("keys", "open")
                for name in order:
                    elapsed = first_chunk_s(client, f"{servers[name].base}/v1/chat/completions", headers[name])
                    if i >= 20:  # warm-up
                        times[name].append(elapsed)
    finally:
        for server in servers.values():
            server.stop()
    med = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {"open_ms": med["open"], "keys_ms": med["keys"], "overhead_ms": med["keys"] - med["open"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        micro = in_process(args.calls, Path(tmp))
        e2e = end_to_end(args.requests, Path(tmp))
    result = {"in_process": micro, "end_to_end": e2e, "requests": args.requests, "calls": args.calls}
    table = (
        "# API keys and limits: overhead on first-token latency\n\n"
        f"`python -m benchmarks.auth_overhead --requests {args.requests} --calls {args.calls}`\n\n"
        "| measure | figure |\n|---|---|\n"
        f"| authenticate + admit + done, in process, median | {micro['median_us']:.1f} µs |\n"
        f"| same, p99 | {micro['p99_us']:.1f} µs |\n"
        f"| first chunk, open gateway, median | {e2e['open_ms']:.2f} ms |\n"
        f"| first chunk, gateway with keys and limits, median | {e2e['keys_ms']:.2f} ms |\n"
        f"| overhead (difference of medians) | {e2e['overhead_ms']:.3f} ms |\n"
    )
    write_report(RESULTS, "auth_overhead", table, result)


if __name__ == "__main__":
    main()
