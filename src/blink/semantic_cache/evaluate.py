"""`blink cache-eval PAIRS.jsonl`: the semantic cache measured on labelled pairs, through its public API.

Each line is {"a": text, "b": text, "label": 1 | 0} (1: b may be answered with a's answer). Each pair gets a
scope of its own (its own tenant), so a pair is judged alone: `a` is stored as a first-turn chat question, then
`b` is looked up with the same settings. A hit on a positive pair is a true hit, on a negative a false hit.
Lookup latency is the whole lookup as a request pays it: embedding `b`, searching, verifying.

With verification on it also prints the precision/recall curve over the judge's operating points (judge.py):
what these pairs would give at each target false-hit rate, and where the configured one sits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blink.bus.messages import GenerateRequest, Sampling
from blink.config import CacheConfig, RedisConfig
from blink.semantic_cache import judge_weights
from blink.semantic_cache.cache import SemanticCache
from blink.semantic_cache.embedder import load_embedder
from blink.semantic_cache.index import VectorIndex

EVAL_TTL_S = 600.0


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    label: int


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a JSON Lines file; ValueError naming the line of the first malformed one."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        ok = isinstance(raw, dict) and isinstance(raw.get("a"), str) and isinstance(raw.get("b"), str)
        if not ok or raw.get("label") not in (0, 1) or isinstance(raw.get("label"), bool):
            raise ValueError(f'{path}:{number}: expected {{"a": string, "b": string, "label": 0 or 1}}')
        pairs.append(Pair(raw["a"], raw["b"], raw["label"]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _request(text: str) -> GenerateRequest:
    message = {"role": "user", "content": text}
    return GenerateRequest(uuid.uuid4().hex, "cache-eval", Sampling(temperature=0.0), messages=(message,))


async def evaluate(pairs: list[Pair], cache: SemanticCache) -> dict[str, Any]:
    """Store each a, look up each b; the figures `blink cache-eval` prints."""
    hits = {0: 0, 1: 0}
    counts = {0: 0, 1: 0}  # pairs judged (those the embedder reads whole), by label
    scored: list[tuple[int, float]] = []  # (label, the judge's score) of pairs past the gate and the rules
    rejected = too_long = 0
    latency, embedding = [], []
    for i, pair in enumerate(pairs):
        tenant = f"cache-eval-{i}"
        if not _fit(cache, pair):
            too_long += 1  # longer than the embedder reads: never cached, so neither a hit nor a miss
            continue
        stored = await cache.lookup(tenant, _request(pair.a))
        if stored is None or not await cache.store(stored, f"answer {i}", 1):
            raise RuntimeError("the cache did not store an entry; is its backend up?")
        started = time.perf_counter()
        found = await cache.lookup(tenant, _request(pair.b))
        latency.append((time.perf_counter() - started) * 1000)
        assert found is not None
        embedding.append(found.embed_ms)
        counts[pair.label] += 1
        hits[pair.label] += found.hit is not None
        rejected += found.rejected
        if found.best_score is not None:
            scored.append((pair.label, found.best_score))
    positives, negatives = counts[1], counts[0]
    lat = np.array(latency)
    return {
        "pairs": len(pairs) - too_long,
        "too_long": too_long,
        "positives": positives,
        "negatives": negatives,
        "threshold": cache.config.cache_threshold,
        "verify": cache.config.cache_verify,
        "index": cache.index.name,
        "hit_rate_positives": hits[1] / positives if positives else None,
        "false_hit_rate_negatives": hits[0] / negatives if negatives else None,
        "precision": hits[1] / (hits[0] + hits[1]) if hits[0] + hits[1] else None,
        "true_hits": hits[1],
        "false_hits": hits[0],
        "rejected_by_verification": rejected,
        "lookup_ms": {q: round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)},
        "embedding_share": round(float(np.sum(embedding) / np.sum(lat)), 3),
        "false_hit_rate_target": cache.config.cache_false_hit_rate,
        "curve": _curve(scored, positives, negatives, cache.judge.threshold) if cache.config.cache_verify else [],
    }


def _curve(scored: list[tuple[int, float]], positives: int, negatives: int, default: float) -> list[dict[str, Any]]:
    """These pairs' figures at each of the judge's operating points (its measured rate: `target`)."""
    out = []
    for threshold, rate, _ in judge_weights.CURVE:
        true = sum(1 for label, score in scored if label == 1 and score >= threshold)
        false = sum(1 for label, score in scored if label == 0 and score >= threshold)
        out.append(
            {
                "target": rate,
                "threshold": threshold,
                "default": threshold == default,
                "recall": true / positives if positives else None,
                "false_hit_rate": false / negatives if negatives else None,
                "precision": true / (true + false) if true + false else None,
            }
        )
    return out


def _fit(cache: SemanticCache, pair: Pair) -> bool:
    return cache.fits(pair.a) and cache.fits(pair.b)


def _index(config: CacheConfig, redis: RedisConfig, size: int) -> VectorIndex:
    url = config.cache_redis or redis.redis
    if url:
        from blink.semantic_cache.redis import RedisIndex

        prefix = f"blink:cache-eval:{uuid.uuid4().hex[:8]}"
        return RedisIndex(url, size, prefix=prefix, password=redis.redis_password or None)
    from blink.semantic_cache.memory import MemoryIndex

    return MemoryIndex(size)


def _report(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    lat = result["lookup_ms"]
    return "\n".join(
        [
            f"pairs {result['pairs']} ({result['positives']} positive, {result['negatives']} negative; "
            f"{result['too_long']} left out, longer than the embedder reads); "
            f"threshold {result['threshold']}, verification {'on' if result['verify'] else 'off'}, "
            f"index {result['index']}",
            f"hit rate on positives    {pct(result['hit_rate_positives'])}",
            f"false-hit rate on negatives {pct(result['false_hit_rate_negatives'])}",
            f"precision of hits        {pct(result['precision'])} ({result['true_hits']} true, "
            f"{result['false_hits']} false; {result['rejected_by_verification']} candidates refused by verification)",
            f"lookup latency           p50 {lat[50]} ms, p90 {lat[90]} ms, p99 {lat[99]} ms "
            f"(embedding {100 * result['embedding_share']:.0f}% of it)",
            *_curve_lines(result["curve"], pct),
        ]
    )


def _curve_lines(curve: list[dict[str, Any]], pct: Callable[[float | None], str]) -> list[str]:
    if not curve:
        return []
    lines = ["", "--cache-false-hit-rate  recall on these  false hits on these  precision on these"]
    step = max(1, len(curve) // 15)
    for i, point in enumerate(curve):
        if point["default"] or i % step == 0:
            mark = "  <- configured" if point["default"] else ""
            lines.append(
                f"{point['target']:<23} {pct(point['recall']):>15}  {pct(point['false_hit_rate']):>19}  "
                f"{pct(point['precision']):>17}{mark}"
            )
    return lines


def run(path: Path, config: CacheConfig, redis: RedisConfig, cache_dir: Path, as_json: bool) -> int:
    try:
        pairs = read_pairs(path)
    except (OSError, ValueError) as exc:
        print(f"blink cache-eval: {exc}", file=sys.stderr)
        return 2
    embedder = load_embedder(config.cache_embedder, cache_dir, config.cache_embedder_threads)

    # entries go under a prefix of their own and expire within EVAL_TTL_S, so a run leaves nothing lasting
    config = dataclasses.replace(config, cache_ttl_s=min(config.cache_ttl_s, EVAL_TTL_S))

    async def main() -> dict[str, Any]:
        cache = SemanticCache(_index(config, redis, len(pairs) + 1), lambda: embedder, config)
        try:
            return await evaluate(pairs, cache)
        finally:
            await cache.close()

    result = asyncio.run(main())
    print(json.dumps(result) if as_json else _report(result))
    return 0
