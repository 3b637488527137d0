"""The shared VectorIndex: Redis 8 Vector Sets (HNSW, Q8-quantised), usable by every gateway at once.

Keys, for a prefix P:
    P:vs:<scope.key>   a vector set per scope; element = entry id, attributes = the entry as JSON
                       ({"q", "a", "t", "c", "exp"}); the key expires with its last entry
    P:lru              sorted set of "<scope.key>|<id>" scored by last use: the global size cap
    P:exp              sorted set of the same members scored by expiry: the sweep of expired entries

Costs: `add` is one pipelined round trip, plus one when it sweeps or evicts; `search` and `touch` are one.
Every failure (connection refused, timeout, a Redis error reply) is raised as CacheUnavailable within about
`timeout_s` (one immediate reconnect is tried on a dropped connection, never on a timeout); the client connects
again by itself on a later call, so one RedisIndex outlives a Redis restart.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, cast

import numpy as np
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from blink.bus.redis_wire import client, redact
from blink.errors import CacheUnavailable
from blink.semantic_cache.index import Candidate, Entry, Scope

SWEEP_BATCH = 100  # expired entries one add removes at most; the rest go on the next adds
EVICT_WINDOW = 16  # LRU victims one add removes at most (an add adds one, so the cap is restored quickly)
SCAN_COUNT = 500  # keys or members per SCAN/ZSCAN round trip in invalidate


class RedisIndex:
    """A VectorIndex in Redis 8 (Vector Sets are built in from 8.0).

    Similarity is approximate (Q8 vectors, HNSW graph): within about 0.02 of the true cosine, and a search may
    rarely miss a neighbour. Concurrent gateways may briefly exceed `max_entries` by a few entries (eviction reads
    the size, then removes), never by more than one add's worth each.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        max_entries: int,
        dim: int = 384,
        prefix: str = "blink:cache",
        timeout_s: float = 0.25,
        *,
        password: str | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.dim = dim
        self._where = redact(url)
        self._vs = f"{prefix}:vs:"
        self._lru = f"{prefix}:lru"
        self._exp = f"{prefix}:exp"
        # redis-py's default retry (10 tries, backoff to 1 s) would turn a dead Redis into seconds of waiting:
        # retry once, at once, and only a dropped connection (a restarted Redis), never a timeout.
        self._client = client(  # `url`, `password`: as bus/redis_wire.client (rediss:// for TLS)
            url,
            password,
            decode_responses=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        )

    async def add(self, scope: Scope, vector: np.ndarray, entry: Entry) -> None:
        blob = self._blob(vector)
        key = self._vs + scope.key
        member = f"{scope.key}|{entry.id}"
        e = entry  # ensure_ascii (json's default) keeps lone surrogates, which UTF-8 cannot carry
        attrs = json.dumps({"q": e.query, "a": e.answer, "t": e.completion_tokens, "c": e.created, "exp": e.expires})
        expire_ms = math.ceil(entry.expires * 1000)
        now = time.time()
        async with self._guard():
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("VADD", key, "FP32", blob, entry.id, "Q8", "SETATTR", attrs)
            # the key lives as long as its longest-lived entry: NX sets a first expiry, GT only ever extends it
            pipe.execute_command("PEXPIREAT", key, expire_ms, "NX")
            pipe.execute_command("PEXPIREAT", key, expire_ms, "GT")
            pipe.zadd(self._lru, {member: now})
            pipe.zadd(self._exp, {member: entry.expires})
            pipe.zcard(self._lru)
            pipe.zrange(self._lru, 0, EVICT_WINDOW - 1)
            pipe.zrangebyscore(self._exp, "-inf", now, start=0, num=SWEEP_BATCH)
            *_, size, oldest, expired = await pipe.execute()
            excess = int(size) - self.max_entries
            victims = set(cast(list[str], expired)) | set(cast(list[str], oldest)[: max(0, excess)])
            if victims:
                pipe = self._client.pipeline(transaction=False)
                for victim in victims:
                    scope_key, _, entry_id = victim.rpartition("|")
                    pipe.execute_command("VREM", self._vs + scope_key, entry_id)  # an emptied set deletes itself
                pipe.zrem(self._lru, *victims)
                pipe.zrem(self._exp, *victims)
                await pipe.execute()

    async def search(self, scope: Scope, vector: np.ndarray, k: int, now: float) -> list[Candidate]:
        blob = self._blob(vector)
        if k <= 0:
            return []
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        # the FILTER grammar takes 1e16 but not Python's 1e+16: write the float positionally, exactly
        where = f".exp > {Decimal(repr(float(now))):f}"
        async with self._guard():
            command = cast(Callable[..., Awaitable[Any]], self._client.execute_command)  # redis-py leaves it untyped
            reply = await command(
                "VSIM", self._vs + scope.key, "FP32", blob, "WITHSCORES", "WITHATTRIBS", "COUNT", k, "FILTER", where
            )
        # redis-py parses the reply to {id: [score, attributes]} (RESP2 and RESP3 alike); a missing key gives []
        found = []
        for entry_id, (score, attributes) in cast(dict[str, tuple[float, str]], reply or {}).items():
            a = json.loads(attributes)
            entry = Entry(entry_id, a["q"], a["a"], int(a["t"]), float(a["c"]), float(a["exp"]))
            found.append(Candidate(entry, 2.0 * float(score) - 1.0))  # VSIM scores (1 + cosine) / 2
        found.sort(key=lambda c: -c.similarity)
        return found

    async def touch(self, scope: Scope, entry_id: str) -> None:
        async with self._guard():
            await self._client.zadd(self._lru, {f"{scope.key}|{entry_id}": time.time()}, xx=True)

    async def invalidate(self, tenant: str, model: str | None = None) -> int:
        """Drop the tenant's scopes (of `model` only, if given); returns the entries their vector sets held."""
        scopes = f"{_glob(tenant)}:{_glob(model)}:*" if model is not None else f"{_glob(tenant)}:*"
        async with self._guard():
            keys = {k async for k in self._client.scan_iter(match=self._vs + scopes, count=SCAN_COUNT)}
            members = {m async for m, _ in self._client.zscan_iter(self._lru, match=scopes, count=SCAN_COUNT)}
            members |= {m async for m, _ in self._client.zscan_iter(self._exp, match=scopes, count=SCAN_COUNT)}
            if not keys and not members:
                return 0
            pipe = self._client.pipeline(transaction=False)
            for key in keys:  # a set: SCAN may return a key twice, and it must be counted once
                pipe.execute_command("VCARD", key)
            if keys:
                pipe.delete(*keys)
            if members:
                pipe.zrem(self._lru, *members)
                pipe.zrem(self._exp, *members)
            replies = await pipe.execute()
        return sum(int(n or 0) for n in replies[: len(keys)])

    async def count(self) -> int:
        async with self._guard():
            return int(await self._client.zcard(self._lru))

    async def close(self) -> None:
        async with self._guard():
            await self._client.aclose()

    def _blob(self, vector: np.ndarray) -> bytes:
        if vector.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {vector.shape}")
        return np.ascontiguousarray(vector, dtype="<f4").tobytes()  # FP32 is little-endian float32

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turn every transport or server failure into CacheUnavailable (OSError covers the builtin
        ConnectionError and TimeoutError, which asyncio raises)."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"redis at {self._where}: {exc}") from exc


def _glob(text: str) -> str:
    """`text` matched literally by a SCAN/ZSCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
