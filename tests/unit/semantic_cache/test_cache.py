"""The cache policy (semantic_cache/cache.py): scopes, cacheability, hits, verification, degradation.

The embedder is the bag-of-words stand-in (tests/unit/preload/fakes.py) so similarities are predictable; the
index is the real in-memory one. The end-to-end tests use the real model and Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from blink.bus.messages import GenerateRequest, Sampling
from blink.config import CacheConfig
from blink.errors import CacheUnavailable
from blink.semantic_cache.cache import SemanticCache, tenant_of
from blink.semantic_cache.index import Candidate, Entry, Scope
from blink.semantic_cache.memory import MemoryIndex
from tests.unit.preload.fakes import DIM, HashEmbedder

WINDOW = 40  # words the fake embedder reads


class FakeEmbedder:
    name = "hash"
    dim = DIM

    def __init__(self) -> None:
        self._embed = HashEmbedder()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts)

    def fits(self, text: str) -> bool:
        return len(text.split()) <= WINDOW


def chat(*messages: tuple[str, str], model: str = "m", **sampling: Any) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(
        "r", model, Sampling(**sampling), messages=tuple({"role": r, "content": c} for r, c in messages)
    )


def make(config: CacheConfig | None = None, index: Any = None, clock: Any = None) -> SemanticCache:
    embedder = FakeEmbedder()
    kwargs = {"clock": clock} if clock else {}
    cache = SemanticCache(index or MemoryIndex(100, DIM), lambda: embedder, config or CacheConfig(), **kwargs)
    # the stand-in's similarities are not the model's, which the judge was fitted on: here it accepts whatever
    # passes the threshold and the rules (test_probes.py and test_judge.py test it on the real embedder)
    cache.judge.threshold = float("-inf")
    return cache


async def remember(cache: SemanticCache, key: str, request: GenerateRequest, answer: str = "A", quota: int = 0) -> None:
    lookup = await cache.lookup(key, request, quota=quota)
    assert lookup is not None and lookup.hit is None
    assert await cache.store(lookup, answer, 3)


async def outcome(cache: SemanticCache, key: str, request: GenerateRequest) -> str:
    lookup = await cache.lookup(key, request)
    return "off" if lookup is None else "hit" if lookup.hit else "miss"


Q = ("user", "how do I reset my password")


def test_a_stored_answer_is_found_again_and_only_in_its_own_scope() -> None:
    async def body() -> None:
        cache = make()
        await remember(cache, "key-a", chat(("system", "be brief"), Q))
        assert await outcome(cache, "key-a", chat(("system", "be brief"), Q)) == "hit"
        assert await outcome(cache, "key-b", chat(("system", "be brief"), Q)) == "miss"  # another tenant
        assert await outcome(cache, "default", chat(("system", "be brief"), Q)) == "miss"  # the open server's tenant
        assert await outcome(cache, "key-a", chat(("system", "be brief"), Q, model="other")) == "miss"
        assert await outcome(cache, "key-a", chat(("system", "be verbose"), Q)) == "miss"
        assert await outcome(cache, "key-a", chat(Q)) == "miss"  # no system prompt
        assert await outcome(cache, "key-a", chat(("system", "be brief"), Q, temperature=0.7)) == "miss"
        assert await outcome(cache, "key-a", chat(("system", "be brief"), Q, seed=1)) == "miss"
        assert await outcome(cache, "key-a", chat(("system", "be brief"), Q, stop=("\n",))) == "miss"

    asyncio.run(body())


def test_tenant_digests_hide_the_name_and_differ() -> None:
    assert "acme" not in tenant_of("acme")
    assert tenant_of("a") != tenant_of("b") != tenant_of("default")


def test_a_paraphrase_hits_and_a_negated_or_renumbered_query_does_not() -> None:
    async def body() -> None:
        cache = make(CacheConfig(cache_threshold=0.6))
        await remember(cache, "default", chat(("user", "how do I cancel my subscription")))
        assert await outcome(cache, "default", chat(("user", "how do I cancel my subscription please"))) == "hit"
        refused = await cache.lookup("default", chat(("user", "how do I not cancel my subscription")))
        assert refused is not None and refused.hit is None and refused.rejected == 1
        await remember(cache, "default", chat(("user", "send 100 USD to Bob")))
        assert await outcome(cache, "default", chat(("user", "send 1000 USD to Bob"))) == "miss"
        no_verify = make(CacheConfig(cache_threshold=0.6, cache_verify=False))
        await remember(no_verify, "default", chat(("user", "how do I cancel my subscription")))
        assert await outcome(no_verify, "default", chat(("user", "how do I not cancel my subscription"))) == "hit"

    asyncio.run(body())


def test_below_the_threshold_is_a_miss() -> None:
    async def body() -> None:
        cache = make(CacheConfig(cache_threshold=0.99))
        await remember(cache, "default", chat(("user", "how do I cancel my subscription")))
        assert await outcome(cache, "default", chat(("user", "how do I cancel my subscription please"))) == "miss"

    asyncio.run(body())


def test_what_is_not_cacheable() -> None:
    async def body() -> None:
        cache = make()
        later = chat(("user", "hi"), ("assistant", "hello"), Q)
        assert cache.key("default", later) is None  # default: first turns only
        assert cache.key("default", chat(Q, ("assistant", "partial"))) is None  # does not end with a user message
        assert cache.key("default", chat(("user", "   "))) is None
        assert cache.key("default", replace(chat(Q), prefill_only=True)) is None
        assert cache.key("default", replace(chat(Q), priority=1)) is None
        assert cache.key("default", replace(chat(Q), open_last=True)) is None
        everything = make(CacheConfig(cache_turns="all"))
        await remember(everything, "default", later)
        assert await outcome(everything, "default", later) == "hit"
        other_history = chat(("user", "hi"), ("assistant", "hey there"), Q)
        assert await outcome(everything, "default", other_history) == "miss"
        assert await outcome(everything, "default", chat(Q)) == "miss"

    asyncio.run(body())


def test_a_query_longer_than_the_embedder_reads_is_neither_looked_up_nor_stored() -> None:
    # a question after a long document: a truncating embedder would see the document only, and two different
    # questions about it would look the same
    cache = make()
    document = " ".join(f"word{i}" for i in range(WINDOW))

    async def run() -> None:
        assert await outcome(cache, "default", chat(("user", document + " who wrote it"))) == "off"
        await remember(cache, "default", chat(("user", "who wrote it")))  # a short one still is
        assert await outcome(cache, "default", chat(("user", "who wrote it"))) == "hit"

    asyncio.run(run())
    assert cache.snapshot()["too_long"] == 1 and cache.stats.lookups == 2


def test_completions_and_chats_do_not_share_entries() -> None:
    async def body() -> None:
        cache = make()
        completion = GenerateRequest("r", "m", Sampling(temperature=0.0), prompt=Q[1])
        await remember(cache, "default", completion)
        assert await outcome(cache, "default", completion) == "hit"
        assert await outcome(cache, "default", chat(Q)) == "miss"

    asyncio.run(body())


def test_an_answer_longer_than_max_tokens_is_not_a_hit() -> None:
    async def body() -> None:
        cache = make()
        await remember(cache, "default", chat(Q))  # stored with 3 completion tokens
        assert await outcome(cache, "default", chat(Q, max_tokens=3)) == "hit"
        assert await outcome(cache, "default", chat(Q, max_tokens=2)) == "miss"

    asyncio.run(body())


def test_entries_expire_after_the_ttl() -> None:
    async def body() -> None:
        now = [1000.0]
        cache = make(CacheConfig(cache_ttl_s=60), clock=lambda: now[0])
        await remember(cache, "default", chat(Q))
        now[0] += 59
        assert await outcome(cache, "default", chat(Q)) == "hit"
        now[0] += 2
        assert await outcome(cache, "default", chat(Q)) == "miss"

    asyncio.run(body())


def test_invalidation_drops_one_tenant_or_one_model_of_it() -> None:
    async def body() -> None:
        cache = make()
        await remember(cache, "a", chat(Q))
        await remember(cache, "a", chat(Q, model="other"))
        await remember(cache, "b", chat(Q))
        assert await cache.invalidate("a", "other") == 1
        assert await outcome(cache, "a", chat(Q, model="other")) == "miss"
        assert await outcome(cache, "a", chat(Q)) == "hit"
        assert await cache.invalidate("a") == 1
        assert await outcome(cache, "a", chat(Q)) == "miss"
        assert await outcome(cache, "b", chat(Q)) == "hit"

    asyncio.run(body())


def test_a_tenant_past_its_quota_evicts_its_own_answers_never_another_tenants() -> None:
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "india")  # no two share a bucket

    async def body() -> None:
        cache = make(index=MemoryIndex(6, DIM))
        for word in words[:3]:
            await remember(cache, "small", chat(("user", word)), quota=3)
        for word in words:  # more than the whole index holds
            await remember(cache, "big", chat(("user", word)), quota=3)
        assert [await outcome(cache, "small", chat(("user", w))) for w in words[:3]] == ["hit"] * 3
        assert [await outcome(cache, "big", chat(("user", w))) for w in words] == ["miss"] * 5 + ["hit"] * 3
        with pytest.raises(ValueError, match="quota"):
            await cache.lookup("big", chat(Q), quota=-1)

    asyncio.run(body())


def test_the_snapshot_names_no_tenant() -> None:
    """/readyz is open: it must not tell who uses the cache, or how much."""

    async def body() -> None:
        cache = make()
        await remember(cache, "acme", chat(Q), quota=5)
        shown = json.dumps(cache.snapshot())
        assert "acme" not in shown and tenant_of("acme") not in shown
        assert set(cache.snapshot()) == {
            "index", "ready", "lookups", "hits", "rejected_by_verification", "stores", "errors", "too_long",
            "available",
        }  # fmt: skip

    asyncio.run(body())


def test_a_hit_is_not_stored_again_and_an_empty_answer_never() -> None:
    async def body() -> None:
        cache = make()
        lookup = await cache.lookup("default", chat(Q))
        assert lookup is not None
        assert not await cache.store(lookup, "", 0)
        await remember(cache, "default", chat(Q))
        hit = await cache.lookup("default", chat(Q))
        assert hit is not None and hit.hit is not None
        assert not await cache.store(hit, "again", 1)
        assert cache.stats.stores == 1

    asyncio.run(body())


class FlakyIndex(MemoryIndex):
    """The in-memory index with a switch that makes every call fail as a dead backend does."""

    def __init__(self) -> None:
        super().__init__(100, DIM)
        self.down = False

    def _fail_if_down(self) -> None:
        if self.down:
            raise CacheUnavailable("backend down")

    async def add(self, scope: Scope, vector: np.ndarray, entry: Entry, quota: int = 0) -> None:
        self._fail_if_down()
        await super().add(scope, vector, entry, quota)

    async def search(self, scope: Scope, vector: np.ndarray, k: int, now: float) -> list[Candidate]:
        self._fail_if_down()
        return await super().search(scope, vector, k, now)


def test_a_dead_backend_is_a_logged_miss_and_a_recovered_one_is_used_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        now = [1000.0]
        index = FlakyIndex()
        cache = make(index=index, clock=lambda: now[0])
        await remember(cache, "default", chat(Q))
        index.down = True
        with caplog.at_level(logging.WARNING, "blink.semantic_cache"):
            assert await outcome(cache, "default", chat(Q)) == "off"
            assert await outcome(cache, "default", chat(Q)) == "off"  # backing off: not even tried
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert cache.stats.errors == 1
        index.down = False
        assert await outcome(cache, "default", chat(Q)) == "off"  # still inside the back-off window
        now[0] += 1.5
        assert await outcome(cache, "default", chat(Q)) == "hit"

    asyncio.run(body())


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        make(CacheConfig(cache_threshold=0))
    with pytest.raises(ValueError, match="ttl"):
        make(CacheConfig(cache_ttl_s=0))
