"""The cache's promise never to answer a different question, probed with the real embedder and the default
CacheConfig on hand-written pairs (probes.jsonl): `b` negates `a`, changes a number in it, swaps two of its
roles, or adds a condition to it, so `a`'s answer must not answer `b`.

Each pair is judged alone, as `blink cache-eval` judges one (semantic_cache/evaluate.py): `a` is stored as a
first-turn chat question under a tenant of its own, then `b` is looked up through the public API. A sanity
test checks that obvious paraphrases still hit, so a cache that never hits cannot pass the probes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from blink.bus.messages import GenerateRequest, Sampling
from blink.config import CacheConfig, default_cache_dir
from blink.semantic_cache.cache import SemanticCache
from blink.semantic_cache.embedder import Embedder, load_embedder
from blink.semantic_cache.memory import MemoryIndex

PROBES = Path(__file__).with_name("probes.jsonl")
KINDS = ("negation", "number", "swapped_role", "added_condition")
MIN_PER_KIND = 50

PARAPHRASES = [
    ("How do I boil an egg?", "How do you boil an egg?"),
    ("What is the capital of France?", "what is the capital of france"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I make pancakes?", "How do I make pancakes?"),
    ("What is the best way to learn Python?", "What's the best way to learn Python?"),
    ("How do I change a flat tire?", "How do you change a flat tire?"),
    ("Why is the sky blue?", "Why is the sky blue"),
    ("What are the symptoms of the flu?", "What are the symptoms of flu?"),
]


def read_probes() -> dict[str, list[tuple[str, str]]]:
    probes: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in PROBES.read_text().splitlines():
        if line.strip():
            raw = json.loads(line)
            probes[raw["kind"]].append((raw["a"], raw["b"]))
    return probes


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    config = CacheConfig()
    return load_embedder(config.cache_embedder, default_cache_dir(), config.cache_embedder_threads)


def _request(text: str) -> GenerateRequest:
    message = {"role": "user", "content": text}
    return GenerateRequest(uuid.uuid4().hex, "probe", Sampling(temperature=0.0), messages=(message,))


def hits(pairs: list[tuple[str, str]], embedder: Embedder) -> list[tuple[str, str]]:
    """The pairs whose `b` is answered with `a`'s answer: store each `a` in a scope of its own, look up `b`."""

    async def body() -> list[tuple[str, str]]:
        cache = SemanticCache(MemoryIndex(len(pairs) + 1, embedder.dim), lambda: embedder, CacheConfig())
        found = []
        try:
            for i, (a, b) in enumerate(pairs):
                tenant = f"probe-{i}"
                stored = await cache.lookup(tenant, _request(a))
                assert stored is not None and stored.hit is None, a
                assert await cache.store(stored, f"answer {i}", 1)
                lookup = await cache.lookup(tenant, _request(b))
                assert lookup is not None, b
                if lookup.hit is not None:
                    found.append((a, b))
        finally:
            await cache.close()
        return found

    return asyncio.run(body())


def test_the_probe_file_has_enough_distinct_pairs_of_each_kind() -> None:
    probes = read_probes()
    assert set(probes) == set(KINDS)
    for kind in KINDS:
        assert len(probes[kind]) >= MIN_PER_KIND, kind
        assert all(a != b for a, b in probes[kind]), kind


@pytest.mark.parametrize("kind", KINDS)
def test_a_different_question_is_never_answered(kind: str, embedder: Embedder) -> None:
    pairs = read_probes()[kind]
    wrong = hits(pairs, embedder)
    listing = "\n".join(f"  {a!r} -> {b!r}" for a, b in wrong)
    assert not wrong, f"{len(wrong)} of {len(pairs)} {kind} probes hit:\n{listing}"


def test_obvious_paraphrases_still_hit(embedder: Embedder) -> None:
    assert hits(PARAPHRASES, embedder), "no paraphrase hit: a cache that never hits passes the probes trivially"
