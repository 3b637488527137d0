"""The cache policy: what is cacheable, under which scope, when a candidate counts as a hit, and what happens
when the index's backend is down.

    lookup = await cache.lookup(tenant, request, quota=limits.cache_entries)   # None: not cacheable (or down)
    if lookup and lookup.hit: stream lookup.hit.entry.answer
    ... the model answers; only a response that completed (stop token or stop string) is stored:
    await cache.store(lookup, text, completion_tokens)

Scope (a hard partition; semantic_cache/index.py never mixes scopes): the tenant (a digest of its name, which
the gateway's keys give), the model, and a digest of everything else that changes the answer: the kind of
request (chat or completion), the system messages (with retrieved documents, which realtime sessions put
there), the sampling settings (temperature, top_p, top_k, seed, stop, ignore_eos) and the conversation before
the last user message. `max_tokens` is not part of the scope: a stored answer completed in n tokens is the
answer to any request allowing n or more, and one allowing fewer misses.

Which chat requests: by default (`cache_turns` "first") only a conversation's first user turn, i.e. system
messages and one user message; with "all" any request ending with a user message, each in the scope of its
own history. Background requests (pre-loads) never touch the cache.

Room: a tenant's answers hold at most its quota of entries (TenantLimits.cache_entries, given to `lookup` and
kept in the Lookup for `store`); storing past it evicts the tenant's own least recently used answers, never
another tenant's, and a full index evicts from the tenant holding the most (semantic_cache/index.py states
the rule). `snapshot` (shown on the open /readyz) counts over all tenants and names none.

A hit: the best candidates (up to CANDIDATES) at or above the threshold are verified in order: verify.py's rules
(numbers, negation, names, roles, conditions) and then judge.py's model of the pair at the operator's target
false-hit rate; the first that passes both is the hit. The backend going away (CacheUnavailable) makes
lookups misses and stores no-ops, with a warning; the cache retries after a back-off (1 s, doubling to 10 s).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from blink.bus.messages import GenerateRequest
from blink.config import CacheConfig, RedisConfig
from blink.errors import CacheUnavailable
from blink.semantic_cache.embedder import Embedder
from blink.semantic_cache.index import Entry, Scope, VectorIndex
from blink.semantic_cache.judge import Judge
from blink.semantic_cache.verify import disagreement

log = logging.getLogger("blink.semantic_cache")

CANDIDATES = 4
BACKOFF_S = (1.0, 10.0)  # first and longest wait before trying a backend that failed again


def _digest(value: Any, size: int = 32) -> str:
    raw = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:size]


def tenant_of(tenant: str) -> str:
    """The digest naming a tenant in the index (no tenant name appears in clear there)."""
    return _digest(["tenant", tenant], 24)


@dataclass(frozen=True)
class Hit:
    entry: Entry
    similarity: float


@dataclass
class Lookup:
    """One request's cache key and outcome; `store` takes it back after the model answered."""

    scope: Scope
    query: str
    vector: np.ndarray  # [dim], unit length
    hit: Hit | None = None
    lookup_ms: float = 0.0
    embed_ms: float = 0.0
    rejected: int = 0  # candidates above the threshold that verification refused
    best_score: float | None = None  # the judge's highest log-odds among them (cache-eval's curve)
    quota: int = 0  # entries the tenant's answers may hold (0: no quota of its own), for `store`

    def timings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache": "hit" if self.hit else "miss", "cache_lookup_ms": round(self.lookup_ms, 3)}
        out["cache_embed_ms"] = round(self.embed_ms, 3)
        if self.hit:
            out["cache_similarity"] = round(self.hit.similarity, 4)
        return out


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    rejected: int = 0  # candidates refused by verification
    stores: int = 0
    errors: int = 0  # backend failures (each a miss or a skipped store)
    too_long: int = 0  # queries longer than the embedder reads: neither looked up nor stored


class SemanticCache:
    def __init__(
        self,
        index: VectorIndex,
        embedder: Callable[[], Embedder | None],
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`embedder()` returns the embedder once it is loaded (None before: lookups are skipped)."""
        if not 0 < config.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in (0, 1], got {config.cache_threshold}")
        if config.cache_ttl_s <= 0:
            raise ValueError(f"cache_ttl_s must be positive, got {config.cache_ttl_s}")
        self.judge = Judge(config.cache_false_hit_rate)  # ValueError outside (0, 1)
        self.index = index
        self._embedder = embedder
        self.config = config
        self._clock = clock
        self.stats = CacheStats()
        self._down_until = 0.0
        self._backoff = BACKOFF_S[0]
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return self._embedder() is not None

    def key(self, tenant: str, request: GenerateRequest) -> tuple[Scope, str] | None:
        """(scope, query text) of a cacheable request of `tenant`; None: not cacheable."""
        if request.prefill_only or request.priority > 0 or request.open_last:
            return None
        s = request.sampling
        sampling = [s.temperature, s.top_p, s.top_k, s.seed, list(s.stop), s.ignore_eos]
        if request.prompt is not None:
            kind, system, history, query = "completion", [], [], request.prompt
        else:
            messages = list(request.messages or ())
            if not messages or messages[-1]["role"] != "user":
                return None
            system = [m["content"] for m in messages if m["role"] == "system"]
            history = [[m["role"], m["content"]] for m in messages[:-1] if m["role"] != "system"]
            if history and self.config.cache_turns == "first":
                return None
            kind, query = "chat", messages[-1]["content"]
        if not query.strip():
            return None
        digest = _digest([kind, system, sampling, history])
        return Scope(tenant_of(tenant), _digest(["model", request.model], 16), digest), query

    def _available(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, exc: CacheUnavailable, doing: str) -> None:
        self.stats.errors += 1
        if self._clock() >= self._down_until:  # once per outage window, not once per request
            log.warning("semantic cache %s failed, serving without it for %.0f s: %s", doing, self._backoff, exc)
        self._down_until = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_S[1])

    def fits(self, query: str) -> bool:
        """Whether the embedder reads all of `query` (a longer one is never cached); False before it is loaded."""
        embedder = self._embedder()
        return embedder is not None and embedder.fits(query)

    async def lookup(self, tenant: str, request: GenerateRequest, quota: int = 0) -> Lookup | None:
        """The request's cache key with its hit, if any. None when the request is not cacheable, its query is
        longer than the embedder reads, the embedder is not loaded yet, or the backend is down (a miss that will
        not be stored either). `quota`: the entries `tenant`'s answers may hold (its
        TenantLimits.cache_entries; 0: no quota of its own), applied when `store` stores this lookup's answer."""
        if quota < 0:
            raise ValueError(f"cache quota must be 0 (none) or positive, got {quota}")
        key = self.key(tenant, request)
        embedder = self._embedder()
        if key is None or embedder is None or not self._available():
            return None
        scope, query = key
        if not embedder.fits(query):  # the embedding would miss its end (a question after a long document)
            self.stats.too_long += 1
            return None
        started = time.perf_counter()
        vector = (await asyncio.to_thread(embedder.embed, [query]))[0]  # [dim]
        embedded = time.perf_counter()
        lookup = Lookup(scope, query, vector, embed_ms=(embedded - started) * 1000, quota=quota)
        try:
            candidates = await self.index.search(scope, vector, CANDIDATES, self._clock())
        except CacheUnavailable as exc:
            self._failed(exc, "lookup")
            return None
        self._backoff = BACKOFF_S[0]
        self.stats.lookups += 1
        max_tokens = request.sampling.max_tokens
        for candidate in candidates:
            if candidate.similarity < self.config.cache_threshold:
                break
            if max_tokens is not None and candidate.entry.completion_tokens > max_tokens:
                continue
            if self.config.cache_verify:
                if disagreement(query, candidate.entry.query) is not None:
                    lookup.rejected += 1
                    continue
                score = self.judge.score(query, candidate.entry.query, candidate.similarity)
                lookup.best_score = score if lookup.best_score is None else max(lookup.best_score, score)
                if score < self.judge.threshold:
                    lookup.rejected += 1
                    continue
            lookup.hit = Hit(candidate.entry, candidate.similarity)
            self._background(self.index.touch(scope, candidate.entry.id))
            break
        self.stats.rejected += lookup.rejected
        self.stats.hits += lookup.hit is not None
        lookup.lookup_ms = (time.perf_counter() - started) * 1000
        return lookup

    async def store(self, lookup: Lookup, answer: str, completion_tokens: int) -> bool:
        """Store a completed answer under the lookup's scope; False when it was not stored (empty answer, a hit
        being replayed, or the backend is down)."""
        if lookup.hit is not None or not answer or not self._available():
            return False
        now = self._clock()
        entry = Entry(uuid.uuid4().hex, lookup.query, answer, completion_tokens, now, now + self.config.cache_ttl_s)
        try:
            await self.index.add(lookup.scope, lookup.vector, entry, lookup.quota)
        except CacheUnavailable as exc:
            self._failed(exc, "store")
            return False
        self.stats.stores += 1
        return True

    async def invalidate(self, tenant: str, model: str | None = None) -> int:
        """Drop every answer of `tenant` (of one model if given); how many went.
        CacheUnavailable propagates: the caller asked for this and must know whether it happened."""
        model_digest = None if model is None else _digest(["model", model], 16)
        return await self.index.invalidate(tenant_of(tenant), model_digest)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except CacheUnavailable as exc:
            self._failed(exc, "touch")

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "index": self.index.name,
            "ready": self.ready,
            "lookups": s.lookups,
            "hits": s.hits,
            "rejected_by_verification": s.rejected,
            "stores": s.stores,
            "errors": s.errors,
            "too_long": s.too_long,
            "available": self._available(),
        }

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)  # touches in flight: quick, let them land
        await self.index.close()


def open_cache(config: CacheConfig, redis: RedisConfig, embedder: Callable[[], Embedder | None]) -> SemanticCache:
    """The semantic cache `config` asks for: Redis 8 Vector Sets when --cache-redis (or --redis) names a Redis,
    else in this process's memory. `embedder`: the loaded embedder, None until it is."""
    index: VectorIndex
    url = config.cache_redis or redis.redis
    if url:
        from blink.semantic_cache.redis import RedisIndex

        index = RedisIndex(url, config.cache_max_entries, password=redis.redis_password or None)
    else:
        from blink.semantic_cache.memory import MemoryIndex

        index = MemoryIndex(config.cache_max_entries)
    return SemanticCache(index, embedder, config)
