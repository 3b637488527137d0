"""Predictive pre-loading, replayed: users type questions about open documents, then submit; with and without drafts.

One `blink serve`, one client process, the two modes interleaved question by question so they share the machine's
state. Documents: Wikipedia articles of ../shared/data/rag (CMU QA, S08 set1; their first --doc-words words),
uploaded to POST /v1/documents; the questions are the articles' own.

Each measured turn is a fresh realtime session with retrieval on (--top-k 2; 0 turns it off and the prompt is
instructions + history + question) and the article open (context.open),
holding one earlier turn (the article's first question, answered), so the prompt is: instructions + 2 retrieved
chunks + that turn + the new question. Each session is a new user with their own instructions, so no turn finds
another's prompt in the cache (one user at a time, as the target asks). The user types the question word by word
(--word-ms, +-30% jitter); with pre-loading, a draft goes out after every word (no debouncing); without, nothing
is sent until submit. Submit is conversation.item.create + response.create; time to first token is measured by
this client from that send to the first text delta.

Reported per mode: p50/p95/p99 submit -> first token, prompt tokens served from the cache, and (pre-loading on)
the prediction hit rate (turns whose last pre-load started was a prefix of the final prompt, with the same
retrieved chunks), how often that pre-load had completed by submit, and wasted prefill: tokens pre-loads computed
that no live request reused (the replica counts both, /readyz). Then the effect on others: one live stream's p99
inter-token latency while four other sessions type with drafts, against the same stream while they are connected
and idle.

  python benchmarks/preload.py [--docs 4] [--questions 5] [--word-ms 200] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report
from tests.e2e.conftest import Server

RAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "rag" / "S08"
INSTRUCTIONS = "You answer questions about the documents below in one short sentence."
USERS = itertools.count(1)
RETRIEVAL_TOP_K = 2  # --top-k; 0: no retrieval (the prompt is instructions + history + question)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def articles(count: int, questions: int, words: int) -> list[tuple[str, str, list[str]]]:
    """(document id, text, distinct questions) for the first `count` set1 articles with enough questions."""
    by_file: dict[str, list[str]] = {}
    for line in (RAG / "question_answer_pairs.txt").read_text(encoding="latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 6 and parts[5].startswith("data/set1/") and parts[1].strip().endswith("?"):
            qs = by_file.setdefault(parts[5], [])
            if parts[1].strip() not in qs:
                qs.append(parts[1].strip())
    out = []
    for path, qs in sorted(by_file.items()):
        text_path = RAG / f"{path}.txt.clean"
        if not text_path.exists():
            text_path = RAG / f"{path}.txt"
        if len(qs) > questions and text_path.exists():
            text = " ".join(text_path.read_text(encoding="latin-1").split()[:words])
            out.append((path.replace("/", "-"), text, qs[: questions + 1]))
        if len(out) == count:
            break
    return out


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 120))  # type: ignore[no-any-return]


async def until(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        event = await recv(ws)
        if event["type"] == kind:
            return event
        if event["type"] == "error":
            raise RuntimeError(event["error"])


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def submit(ws: ClientConnection, text: str, max_tokens: int) -> tuple[float, list[float], dict[str, Any]]:
    """Send the user's message and ask for a response: (TTFT s, delta arrival times, response)."""
    start = time.perf_counter()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await send(ws, {"type": "conversation.item.create", "item": item})
    await send(ws, {"type": "response.create", "response": {"temperature": 0, "max_output_tokens": max_tokens}})
    stamps: list[float] = []
    while True:
        event = await recv(ws)
        if event["type"] == "response.output_text.delta":
            stamps.append(time.perf_counter())
        elif event["type"] == "response.done":
            return (stamps[0] - start if stamps else float("nan")), stamps, event["response"]
        elif event["type"] == "error":
            raise RuntimeError(event["error"])


async def open_session(url: str, doc_id: str, earlier: str | None) -> ClientConnection:
    """A new user: their own instructions (so no turn finds another user's prompt in the cache), the document
    open, retrieval on, and `earlier` asked and answered."""
    ws = await connect(url, max_size=None)
    await until(ws, "session.created")
    settings: dict[str, Any] = {"instructions": f"{INSTRUCTIONS} You are talking with user {next(USERS)}."}
    if RETRIEVAL_TOP_K:
        settings["retrieval"] = {"top_k": RETRIEVAL_TOP_K}
    await send(ws, {"type": "session.update", "session": settings})
    await until(ws, "session.updated")
    await send(ws, {"type": "context.open", "document_ids": [doc_id]})
    if earlier:
        await submit(ws, earlier, 12)
    return ws


async def type_question(ws: ClientConnection, question: str, word_ms: float, rng: random.Random, drafts: bool) -> None:
    words = question.split()
    for i in range(len(words)):
        await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))
        if drafts:  # the text so far, the word just finished followed by a space (the next one is coming)
            await send(ws, {"type": "input_text.draft", "text": " ".join(words[: i + 1]) + " "})
    await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))  # the user reads it over, then presses enter


def background(base: str) -> tuple[int, int]:
    replicas = httpx.get(f"{base}/readyz", timeout=10).json()["replicas"]
    return sum(r["background_prefill_tokens"] for r in replicas), sum(r["background_tokens_used"] for r in replicas)


async def turns(server: Server, docs: list[tuple[str, str, list[str]]], word_ms: float) -> dict[str, list[Any]]:
    rng = random.Random(7)
    out: dict[str, list[Any]] = {"on": [], "off": []}
    order = itertools.cycle([("on", "off"), ("off", "on")])
    for doc_id, _, questions in docs:
        for question in questions[1:]:
            for mode in next(order):
                ws = await open_session(server.ws_url, doc_id, questions[0])
                try:
                    await type_question(ws, question, word_ms, rng, drafts=mode == "on")
                    ttft, _, response = await submit(ws, question, 8)
                finally:
                    await ws.close()
                out[mode].append({"ttft_s": ttft, "timings": response["timings"], "question": question})
                print(f"{mode:3} {ttft * 1000:7.1f} ms  {response['timings']}", file=sys.stderr, flush=True)
    return out


async def itl_effect(
    server: Server, docs: list[tuple[str, str, list[str]]], word_ms: float, rounds: int
) -> dict[str, float]:
    """p99 inter-token latency of one long live stream with four sessions idle vs typing (drafts per word)."""
    rng = random.Random(11)
    gaps: dict[str, list[float]] = {"idle": [], "typing": []}
    # the two modes alternate, idle first in even rounds and typing first in odd ones
    modes = [m for r in range(rounds) for m in (("idle", "typing") if r % 2 == 0 else ("typing", "idle"))]
    for mode in modes:
        others = [await open_session(server.ws_url, docs[i % len(docs)][0], None) for i in range(4)]
        live = await open_session(server.ws_url, docs[0][0], None)
        try:
            stream = asyncio.create_task(submit(live, "Write a long story about a lighthouse keeper.", 160))
            if mode == "typing":
                pool = [q for _, _, questions in docs for q in questions[1:]]
                qs = [pool[i % len(pool)] for i in range(4)]
                while not stream.done():
                    await asyncio.gather(
                        *(type_question(o, q, word_ms, rng, True) for o, q in zip(others, qs, strict=True))
                    )
                    for o in others:  # the users clear their boxes and start again
                        await send(o, {"type": "input_text.draft", "text": ""})
            _, stamps, _ = await stream
            gaps[mode] += [b - a for a, b in itertools.pairwise(stamps[1:])]
        finally:
            for ws in [*others, live]:
                await ws.close()
    return {
        "idle_p50_ms": pct(gaps["idle"], 0.5) * 1000,
        "idle_p99_ms": pct(gaps["idle"], 0.99) * 1000,
        "typing_p50_ms": pct(gaps["typing"], 0.5) * 1000,
        "typing_p99_ms": pct(gaps["typing"], 0.99) * 1000,
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    ttfts = [r["ttft_s"] * 1000 for r in results]
    prompt = sum(r["timings"]["prompt_tokens"] for r in results)
    cached = sum(r["timings"]["cached_tokens"] for r in results)
    hits = [r for r in results if r["timings"].get("preload_predicted")]
    complete = [r for r in results if r["timings"].get("preloaded")]
    return {
        "turns": len(results),
        "ttft_p50_ms": pct(ttfts, 0.5),
        "ttft_p95_ms": pct(ttfts, 0.95),
        "ttft_p99_ms": pct(ttfts, 0.99),
        "cached_fraction": cached / prompt if prompt else 0.0,
        "hit_rate": len(hits) / len(results) if results else 0.0,
        "complete_rate": len(complete) / len(results) if results else 0.0,
        "ttft_p50_complete_ms": pct([r["ttft_s"] * 1000 for r in complete], 0.5),
        "server_ttft_p50_ms": pct([r["timings"]["ttft_ms"] for r in results], 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=5, help="measured questions per document (per mode)")
    parser.add_argument("--doc-words", type=int, default=1200)
    parser.add_argument("--word-ms", type=float, default=200)
    parser.add_argument("--top-k", type=int, default=2, help="retrieved chunks per prompt (0: retrieval off)")
    parser.add_argument("--itl-rounds", type=int, default=4, help="live streams per mode in the ITL measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("flags", nargs="*", help="extra `blink serve` flags (after --)")
    args = parser.parse_args()
    global RETRIEVAL_TOP_K
    RETRIEVAL_TOP_K = args.top_k
    docs = articles(args.docs, args.questions, args.doc_words)
    args.out.mkdir(parents=True, exist_ok=True)
    server = Server(args.out / "preload-serve.log", *args.flags)
    try:
        server.wait_ready()
        for doc_id, text, _ in docs:
            r = httpx.post(f"{server.base}/v1/documents", json={"id": doc_id, "text": text}, timeout=600)
            r.raise_for_status()
        before = background(server.base)
        results = asyncio.run(turns(server, docs, args.word_ms))
        after = background(server.base)
        itl = asyncio.run(itl_effect(server, docs, args.word_ms, args.itl_rounds))
    finally:
        server.stop()
    on, off = summarize(results["on"]), summarize(results["off"])
    computed, used = after[0] - before[0], after[1] - before[1]
    wasted = computed - used
    rows = [
        ("submit -> first token p50 (ms)", f"{on['ttft_p50_ms']:.0f}", f"{off['ttft_p50_ms']:.0f}"),
        ("submit -> first token p95 (ms)", f"{on['ttft_p95_ms']:.0f}", f"{off['ttft_p95_ms']:.0f}"),
        ("submit -> first token p99 (ms)", f"{on['ttft_p99_ms']:.0f}", f"{off['ttft_p99_ms']:.0f}"),
        (
            "first token p50 as the server times it (ms)",
            f"{on['server_ttft_p50_ms']:.0f}",
            f"{off['server_ttft_p50_ms']:.0f}",
        ),
        ("prompt tokens served from the cache", f"{on['cached_fraction']:.0%}", f"{off['cached_fraction']:.0%}"),
        ("prediction hit rate (the last pre-load started was a prefix of the prompt)", f"{on['hit_rate']:.0%}", "-"),
        ("pre-load complete at submit", f"{on['complete_rate']:.0%}", "-"),
        ("submit -> first token p50 when the pre-load was complete (ms)", f"{on['ttft_p50_complete_ms']:.0f}", "-"),
    ]
    lines = [
        "# Predictive pre-loading: replayed typing, with and without drafts (one `blink serve`, interleaved)",
        "",
        machine(),
        f"Command: `python benchmarks/preload.py --docs {args.docs} --questions {args.questions} "
        f"--doc-words {args.doc_words} --word-ms {args.word_ms:.0f} --top-k {args.top_k}`"
        + (f" -- {' '.join(args.flags)}" if args.flags else ""),
        f"{len(docs)} articles ({', '.join(d for d, _, _ in docs)}), {on['turns']} turns per mode.",
        "",
        "| measure | pre-loading on | off |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Ratio of median submit -> first token, on/off: **{on['ttft_p50_ms'] / off['ttft_p50_ms']:.2f}** "
        "(target <= 0.25).",
        f"Pre-load prefill: {computed} tokens computed, {used} reused by the submitted prompts, {wasted} wasted: "
        f"wasted/useful **{wasted / used if used else float('inf'):.2f}** (target < 3).",
        f"One live stream's inter-token latency, four other sessions idle vs typing with drafts: p50 "
        f"{itl['idle_p50_ms']:.1f} vs {itl['typing_p50_ms']:.1f} ms, p99 {itl['idle_p99_ms']:.1f} vs "
        f"{itl['typing_p99_ms']:.1f} ms: p99 ratio **{itl['typing_p99_ms'] / itl['idle_p99_ms']:.2f}** (target < 1.2).",
    ]
    data = {"on": on, "off": off, "computed": computed, "used": used, "itl": itl, "turns": results}
    name = "preload" if args.top_k else "preload-no-retrieval"
    write_report(args.out, name, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()
