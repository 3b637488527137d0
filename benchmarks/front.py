"""blink in front of an engine, against that engine alone, one run, both up at once:

  --against vllm         `blink serve --engine vllm` (vLLM's AsyncLLM inside blink) beside `vllm serve`, same model
                         (SmolLM2-135M-Instruct exported as a Hugging Face folder) and engine arguments
  --against llamaserver  `blink serve --engine openai` in front of llama-server, beside that llama-server reached
                         directly (same GGUF)

1. The path: the time to first token of a ~100-token chat (greedy, 8 tokens, streamed over SSE), one prompt again
   and again so both answer from their prefix cache (what is left is the path, not the model), sent to each
   alternately (--rounds pairs); blink's added latency is the median of the pairs' differences.
2. Typing: a user with their own instructions (~300 tokens, unique: nothing of theirs is cached before they type)
   types a question word by word (--word-ms, +-30%). Through blink, every word is a draft on the WebSocket
   (pre-loading), then the submit; the engine alone sees only the submit, the same chat. Submit -> first token,
   measured by this client, for --users users one after another, each side alternately first.

  make install-vllm && python benchmarks/front.py --against vllm [--rounds 30] [--users 12]
  benchmarks/peers/setup.sh llamaserver && python benchmarks/front.py --against llamaserver
Writes results/front-<against>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report
from benchmarks.peers.servers import MODEL_NAME, PEERS, Env, Launch, Peer, Server
from benchmarks.peers.workload import Prompts
from benchmarks.preload import send, submit, until
from benchmarks.upstream import front, ttft
from blink.config import default_cache_dir
from blink.models import registry

REPO = Path(__file__).resolve().parents[1]
HF = default_cache_dir() / "hf" / MODEL_NAME  # where tests/conftest.py's hf_model_dir exports it
# the engine arguments both get: blink's defaults for --engine vllm (block size 32, prefix caching, priority
# scheduling), no speculative decoding, and no torch.compile (its minutes of warm-up on a CPU)
COMPILE = {"compilation_config": {"mode": 0}}
INSTRUCTIONS = (
    "You are the help desk of a city library. Answer in one short sentence, politely, and only about the library: "
    "opening hours, borrowing rules, the reading rooms, events, printing, accessibility and membership. "
)
QUESTIONS = [
    "How many books can I borrow at once with a standard card?",
    "Is the reading room on the second floor open on Sunday mornings?",
    "Can I print a colour document from my own laptop here?",
    "Do you lend laptops or tablets to members for use at home?",
    "Where do I return a book when the library is closed?",
    "Is there a quiet study room that I can reserve for a group?",
]


def vllm_alone(env: Env, port: int) -> Launch:
    argv = [str(REPO / ".venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(HF)]
    argv += ["--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    argv += ["--max-num-seqs", "16", "--max-num-batched-tokens", "512", "--block-size", "32"]
    argv += ["--kv-cache-memory-bytes", str(512 << 20), "--enable-prefix-caching", "--scheduling-policy", "priority"]
    return Launch([*argv, "--compilation-config", json.dumps(COMPILE["compilation_config"])], {})


def blink_vllm(env: Env, port: int) -> Launch:
    argv = [str(env.blink_bin), "serve", "--host", "127.0.0.1", "--port", str(port), "--engine", "vllm"]
    argv += ["--model", str(HF), "--served-model-name", MODEL_NAME, "--speculative", "off", "--no-semantic-cache"]
    return Launch([*argv, "--resume-window-s", "0", "--vllm-args", json.dumps(COMPILE)], {})


def instructions(user: int) -> str:
    return f"Session {uuid.uuid4().hex} for reader {user}. " + INSTRUCTIONS * 4


async def typed_through_blink(url: str, system: str, question: str, word_ms: float, rng: random.Random) -> float:
    """Submit -> first token (ms) of a user who typed `question` with a draft after every word."""
    async with connect(url, max_size=None) as ws:
        await until(ws, "session.created")
        await send(ws, {"type": "session.update", "session": {"instructions": system}})
        await until(ws, "session.updated")
        words = question.split()
        for i in range(len(words)):
            await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))
            await send(ws, {"type": "input_text.draft", "text": " ".join(words[: i + 1]) + " "})
        await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))  # reads it over, presses enter
        first, _, response = await submit(ws, question, 8)
        assert response["status"] in ("completed", "incomplete"), response  # incomplete: its 8 tokens
        return first * 1000


async def typed_to_vllm(base: str, system: str, question: str, word_ms: float, rng: random.Random) -> float:
    """The same user against `vllm serve`: it sees nothing until the submit."""
    await asyncio.sleep(word_ms / 1000 * len(question.split()))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    async with httpx.AsyncClient(timeout=120) as client:
        ms, _ = await ttft(client, base, messages, cache=False)
    return ms


async def typing(blink: Server, alone: Server, users: int, word_ms: float) -> dict[str, list[float]]:
    rng = random.Random(7)
    ws_url = blink.base_url.replace("http://", "ws://") + "/v1/realtime"
    out: dict[str, list[float]] = {"blink": [], "alone": []}
    questions = itertools.cycle(QUESTIONS)
    for user in range(users + 1):  # the first user of each warms the path up, unmeasured
        question = next(questions)
        runs = [("blink", typed_through_blink, ws_url), ("alone", typed_to_vllm, alone.base_url)]
        for name, run, url in runs if user % 2 else runs[::-1]:
            ms = await run(url, instructions(user), question, word_ms, rng)
            if user:
                out[name].append(ms)
    return out


async def path(blink: Server, alone: Server, prompts: Prompts, rounds: int) -> dict[str, list[float]]:
    same = list(prompts.request(100, 8).messages)
    out: dict[str, list[float]] = {"alone": [], "blink": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(rounds + 1):
            order = [("alone", alone.base_url), ("blink", blink.base_url)]
            for name, url in order if i % 2 else order[::-1]:
                ms, _ = await ttft(client, url, same, cache=False)
                if i:
                    out[name].append(ms)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


# --against: (engine alone, blink in front of it, what the report calls each, the setting of the run)
SETUPS: dict[str, tuple[Peer, Peer, str, str, str]] = {
    "vllm": (
        Peer("vllm-alone", "vllm serve", "/health", 600, vllm_alone, lambda env: []),
        Peer("blink-vllm", "blink serve --engine vllm", "/readyz", 600, blink_vllm, lambda env: []),
        "vllm serve alone",
        "blink --engine vllm",
        "vLLM CPU build (bf16), both with block size 32, prefix caching, no speculative decoding, no torch.compile",
    ),
    "llamaserver": (
        PEERS["llamaserver"],
        front(["--no-semantic-cache"]),
        "llama-server directly",
        "blink --engine openai in front of it",
        "SmolLM2-135M-Instruct Q4_1; llama-server -np 8 with 2 threads, blink's gateway with 1",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", choices=sorted(SETUPS), default="vllm")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--word-ms", type=float, default=250)
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    if not (HF / "model.safetensors").is_file():
        sys.exit(f"no Hugging Face export at {HF}: python benchmarks/peers/export_hf.py --out {HF}")
    gguf = registry.get(MODEL_NAME).locate()
    env = Env(REPO, REPO / "benchmarks/peers/.venvs", gguf, HF, 2, REPO / ".venv/bin/blink")
    alone_peer, blink_peer, alone_name, blink_name, setting = SETUPS[args.against]
    logs = Path("/tmp") / f"blink-front-{args.against}"
    # blink in front of llama-server finds it on the port before its own (upstream.front)
    with Server(alone_peer, env, args.port, logs / "alone.log") as alone:
        alone.wait_ready()
        with Server(blink_peer, env, args.port + 1, logs / "blink.log") as blink:
            blink.wait_ready()
            started = time.monotonic()
            ms = asyncio.run(path(blink, alone, Prompts.load(HF), args.rounds))
            typed = asyncio.run(typing(blink, alone, args.users, args.word_ms))
            print(f"measured in {time.monotonic() - started:.0f} s", flush=True)
    diffs = [b - a for a, b in zip(ms["alone"], ms["blink"], strict=True)]
    runs: dict[str, Any] = {
        "against": args.against,
        "path_ttft_ms": ms,
        "added_median_ms": statistics.median(diffs),
        "added_p90_ms": p90(diffs),
        "typing_ttft_ms": typed,
        "typing_ratio_median": statistics.median(typed["blink"]) / statistics.median(typed["alone"]),
    }
    lines = [
        f"# {blink_name} against {alone_name}\n",
        f"`python benchmarks/front.py --against {args.against} --rounds {args.rounds} --users {args.users} "
        f"--word-ms {args.word_ms:g}`; {machine()}; {setting}; both up at once.\n",
        f"| what | {alone_name}, median (ms) | {blink_name}, median (ms) | blink, p90 (ms) | alone, p90 (ms) "
        "| blink / alone |",
        "|---|---|---|---|---|---|",
        f"| the path: one ~100-token chat again and again (prefix-cache hits), TTFT | {median(ms['alone']):.1f}"
        f" | {median(ms['blink']):.1f} | {p90(ms['blink']):.1f} | {p90(ms['alone']):.1f} | added "
        f"**{runs['added_median_ms']:.1f} ms** median (p90 {runs['added_p90_ms']:.1f}) |",
        f"| typing, then submit: submit -> first token ({args.users} users, ~300-token instructions of their own) | "
        f"{median(typed['alone']):.1f} | {median(typed['blink']):.1f} | {p90(typed['blink']):.1f} "
        f"| {p90(typed['alone']):.1f} | **{runs['typing_ratio_median']:.2f}x** |",
        "\nAdded: the median of each pair's difference (through blink minus alone). Typing: through blink every "
        "word is a draft on the WebSocket, so the engine's prefix cache holds the instructions and the words typed "
        "before the submit; alone, the engine computes the whole prompt after it.\n",
    ]
    write_report(args.out, f"front-{args.against}", "\n".join(lines) + "\n", runs)


if __name__ == "__main__":
    main()
