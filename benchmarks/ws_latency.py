"""Time to first token and inter-token latency: blink over WebSocket vs transformers `generate` + streamer.

Both run the same model (SmolLM2-135M-Instruct from the same GGUF), the same chat prompts, greedy, the same
output length, one request at a time, on this machine, one after the other in this one run:

  blink:        response.create sent -> first response.output_text.delta received (a real `blink serve` process,
                real WebSocket client, in-memory bus, pre-warmed replica); ITL = gaps between deltas.
  transformers: generate() called -> first text from TextIteratorStreamer (in-process, no network).

    python benchmarks/ws_latency.py [--rounds 3] [--max-tokens 64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from benchmarks.common import PROMPTS as ALL_PROMPTS
from benchmarks.common import transformers_model
from tests.e2e.conftest import Server

PROMPTS = ALL_PROMPTS[:8]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def blink_one(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], str]:
    async with connect(url) as ws:
        await ws.recv()  # session.created
        await ws.send(
            json.dumps({"type": "session.update", "session": {"temperature": 0, "max_output_tokens": max_tokens}})
        )
        await ws.recv()
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.recv()
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "response.create"}))
        stamps, text = [], []
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.output_text.delta":
                stamps.append(time.perf_counter())
                text.append(event["delta"])
            elif event["type"] in ("response.done", "error"):
                break
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)], "".join(text)


def run_blink(rounds: int, max_tokens: int, log_dir: Path) -> dict[str, Any]:
    server = Server(log_dir / "blink-serve.log")
    try:
        server.wait_ready()
        asyncio.run(blink_one(server.ws_url, "Hi", 4))  # one untimed request: connection set-up paths
        ttft, itl, texts = [], [], []
        for _ in range(rounds):
            for prompt in PROMPTS:
                first, gaps, text = asyncio.run(blink_one(server.ws_url, prompt, max_tokens))
                ttft.append(first)
                itl += gaps
                texts.append(text)
    finally:
        server.stop()
    return {"ttft": ttft, "itl": itl, "texts": texts}


def run_transformers(rounds: int, max_tokens: int) -> dict[str, Any]:
    import torch
    import transformers

    from blink.models import registry

    path = registry.get("smollm2-135m-instruct").locate()
    model = transformers_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def one(prompt: str) -> tuple[float, list[float], str]:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            "input_ids": ids,
            "max_new_tokens": max_tokens,
            "do_sample": False,
            "streamer": streamer,
            "pad_token_id": tok.eos_token_id,
        }
        t0 = time.perf_counter()
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        stamps, text = [], []
        for piece in streamer:
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
        thread.join()
        return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)], "".join(text)

    one("Hi")
    ttft, itl, texts = [], [], []
    for _ in range(rounds):
        for prompt in PROMPTS:
            first, gaps, text = one(prompt)
            ttft.append(first)
            itl += gaps
            texts.append(text)
    return {"ttft": ttft, "itl": itl, "texts": texts}


def summary(r: dict[str, Any]) -> dict[str, float]:
    return {
        "ttft_p50_ms": statistics.median(r["ttft"]) * 1000,
        "ttft_p90_ms": pct(r["ttft"], 0.9) * 1000,
        "itl_p50_ms": statistics.median(r["itl"]) * 1000,
        "itl_p90_ms": pct(r["itl"], 0.9) * 1000,
        "requests": len(r["ttft"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    blink = summary(run_blink(args.rounds, args.max_tokens, args.out))
    ref = summary(run_transformers(args.rounds, args.max_tokens))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        ("time to first token, median (ms)", "ttft_p50_ms"),
        ("time to first token, p90 (ms)", "ttft_p90_ms"),
        ("inter-token latency, median (ms)", "itl_p50_ms"),
        ("inter-token latency, p90 (ms)", "itl_p90_ms"),
    ]
    lines = [
        "# blink over WebSocket vs transformers generate + streamer",
        "",
        f"{when}; {cpu}, {os.cpu_count()} cores; SmolLM2-135M-Instruct (same GGUF, fp32), greedy, "
        f"{args.max_tokens} max tokens, {len(PROMPTS)} prompts x {args.rounds} rounds, one request at a time.",
        f"Command: `python benchmarks/ws_latency.py --rounds {args.rounds} --max-tokens {args.max_tokens}`",
        "",
        "| metric | blink (WebSocket) | transformers | blink / transformers |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {blink[key]:.1f} | {ref[key]:.1f} | {blink[key] / ref[key]:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    (args.out / "ws_latency.md").write_text(report)
    (args.out / "ws_latency.json").write_text(json.dumps({"when": when, "blink": blink, "transformers": ref}, indent=1))


if __name__ == "__main__":
    main()
