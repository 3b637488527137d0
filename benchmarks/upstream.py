"""blink in front of llama-server (`blink serve --engine openai`), side by side with llama-server alone, one run.

added latency: the time to first token of a ~100-token chat (streamed, greedy, 8 tokens), sent to llama-server
directly and through blink's gateway and upstream replica, alternating request by request (--rounds each), each
request a fresh part of the text (no prompt-cache hit beyond the chat template, no semantic-cache hit). The
gateway's added first-token latency is the median of the pairs' differences. Measured twice: on one prompt again
and again (the upstream answers from its prompt cache, blink's semantic cache skipped: the path alone), and on
fresh prompts through the semantic cache (its embedding of every query is on a miss's path).

  python benchmarks/upstream.py [--rounds 20] [--out benchmarks/results]

Needs the llama-server that benchmarks/peers/setup.sh installs (benchmarks/peers/.venvs/llamaserver) and its
Hugging Face export of SmolLM2 for the tokenizer (benchmarks/peers/.cache). Writes upstream.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report
from benchmarks.peers.servers import HERE, MODEL_NAME, PEERS, Env, Launch, Peer, Server
from benchmarks.peers.workload import Prompts
from blink.models import registry

REPO = Path(__file__).resolve().parents[1]
FRESH = "fresh ~100-token prompts, semantic cache on (misses)"


def front(flags: list[str]) -> Peer:
    """`blink serve --engine openai` in front of the llama-server on the port before its own."""

    def launch(env: Env, port: int) -> Launch:
        argv = [str(env.blink_bin), "serve", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
        upstream = ["--engine", "openai", "--upstream", f"http://127.0.0.1:{port - 1}", "--resume-window-s", "0"]
        return Launch(argv + upstream + flags, {})

    return Peer("blink-front", "blink serve --engine openai", "/readyz", 120, launch, lambda env: [])


async def ttft(client: httpx.AsyncClient, base: str, messages: Any, cache: bool) -> tuple[float, float | None]:
    """(ms to the first chunk with text, blink's semantic-cache lookup ms from its timings where it sends them)."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}  # blink sends its timings with the usage
    if not cache:
        body["cache"] = False  # blink's per-request switch; llama-server ignores it
    try:
        return await _ttft(client, base, body)
    except httpx.RemoteProtocolError:  # a keep-alive connection the server closed while idle: once more
        return await _ttft(client, base, body)


async def _ttft(client: httpx.AsyncClient, base: str, body: dict[str, Any]) -> tuple[float, float | None]:
    start, first, lookup = time.perf_counter(), None, None
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = (time.perf_counter() - start) * 1000
            lookup = (chunk.get("timings") or {}).get("cache_lookup_ms", lookup)
    if first is None:
        raise RuntimeError(f"{base}: no text")
    return first, lookup


async def pairs(direct: str, through: str, prompts: Prompts, rounds: int, fresh: bool) -> dict[str, list[float]]:
    """TTFT ms of `rounds` requests to each, alternating which goes first: `fresh`, each a new ~100-token text
    through the semantic cache; else one prompt again and again (the upstream's prompt cache holds it: what is
    left is the path, not the model) with blink's cache skipped."""
    out: dict[str, list[float]] = {"direct": [], "through": [], "lookup": []}
    same = prompts.request(100, 8).messages
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(rounds + 1):  # the first pair warms both paths up, unmeasured
            order = [("direct", direct), ("through", through)]
            for name, url in order if i % 2 else order[::-1]:
                messages = list(prompts.request(100, 8).messages if fresh else same)
                ms, lookup = await ttft(client, url, messages, cache=fresh)
                if i:
                    out[name].append(ms)
                    if lookup is not None and name == "through":
                        out["lookup"].append(lookup)
    return out


def summary(ms: dict[str, list[float]]) -> dict[str, float]:
    diffs = [t - d for d, t in zip(ms["direct"], ms["through"], strict=True)]
    return {
        "direct_median_ms": statistics.median(ms["direct"]),
        "through_median_ms": statistics.median(ms["through"]),
        "added_median_ms": statistics.median(diffs),
        "added_p90_ms": statistics.quantiles(diffs, n=10)[-1] if len(diffs) > 1 else diffs[0],
        "lookup_median_ms": statistics.median(ms["lookup"]) if ms["lookup"] else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="llama-server's threads")
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    hf = HERE / ".cache/smollm2-135m-instruct-hf"
    env = Env(REPO, HERE / ".venvs", registry.get(MODEL_NAME).locate(), hf, args.threads, REPO / ".venv/bin/blink")
    prompts = Prompts.load(hf)
    logs = Path("/tmp") / "blink-upstream-bench"
    runs: dict[str, Any] = {}
    with Server(PEERS["llamaserver"], env, args.port, logs / "llama-server.log") as llama:
        llama.wait_ready()
        with Server(front([]), env, args.port + 1, logs / "front.log") as blink:
            blink.wait_ready()
            for label, fresh in (("the path alone: one prompt, prompt-cache hits", False), (FRESH, True)):
                ms = asyncio.run(pairs(llama.base_url, blink.base_url, prompts, args.rounds, fresh))
                runs[label] = {"ttft_ms": ms, **summary(ms)}
            print(f"{label}: {runs[label]['added_median_ms']:.1f} ms added (median)", flush=True)
    lines = [
        "# blink in front of llama-server (`--engine openai`)\n",
        f"`python benchmarks/upstream.py --rounds {args.rounds}`; {machine()}; SmolLM2-135M-Instruct Q4_1, "
        f"llama-server -np 8 with {args.threads} threads, blink's gateway with 1. A ~100-token chat, 8 tokens, "
        "streamed; direct and through blink alternating, each a fresh text.\n",
        "| requests | TTFT direct, median (ms) | TTFT through blink, median (ms) | added, median (ms) | "
        "added, p90 (ms) | blink's semantic-cache lookup, median (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        lines.append(
            f"| {label} | {r['direct_median_ms']:.1f} | {r['through_median_ms']:.1f} | **{r['added_median_ms']:.1f}** "
            f"| {r['added_p90_ms']:.1f} | {r['lookup_median_ms']:.1f} |"
        )
    lines.append(
        "\nAdded: the median of each pair's difference (through blink minus direct). The first row isolates what "
        "blink's path costs (gateway, bus, replica, one more HTTP hop: the upstream answers from its prompt cache); "
        "the second is what a user sees on fresh prompts, where llama-server's own first-token time varies by more "
        "than the difference measured.\n"
    )
    write_report(args.out, "upstream", "\n".join(lines) + "\n", runs)


if __name__ == "__main__":
    main()
