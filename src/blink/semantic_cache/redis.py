"""The shared VectorIndex: Redis 8 Vector Sets (HNSW, Q8-quantised), usable by every gateway at once.

Keys, for a prefix P (an entry's member is "<scope.key>|<id>"; scope.key starts with the tenant's digest):
    P:vs:<scope.key>   a vector set per scope; element = entry id, attributes = the entry as JSON
                       ({"q", "a", "t", "c", "exp"}); the key expires with its last entry
    P:lru:<tenant>     sorted set of the tenant's members scored by last use: its quota and its LRU
    P:tenants          sorted set of tenants scored by the entries each holds: the largest, for the cap
    P:by:<n>           sorted set of the tenants holding n entries scored by their least recent use: ties
    P:exp              sorted set of every member scored by expiry: the sweep of expired entries
    P:size             the entries stored in all
Every write (add, touch, eviction, sweep, invalidate) is one Lua script, so concurrent gateways see these keys
agree with each other and with the vector sets, and the cap and every quota hold after each add. The scripts
compute key names (undeclared keys): standalone Redis only, as before.

Costs: `add`, `search`, `touch` and `count` are one round trip each; `add` also does its evictions inside the
script (at most EVICT_WINDOW per step) and sweeps at most SWEEP_BATCH expired entries.
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
from blink.semantic_cache import redis_lua
from blink.semantic_cache.index import Candidate, Entry, Scope

SWEEP_BATCH = 100  # expired entries one add removes at most; the rest go on the next adds
EVICT_WINDOW = 16  # victims one add evicts at most per step (an add adds one: a lowered quota or cap is restored
# over a few adds without one script blocking Redis for long)
SCAN_COUNT = 500  # keys per SCAN round trip in invalidate


class RedisIndex:
    """A VectorIndex in Redis 8 (Vector Sets are built in from 8.0).

    Similarity is approximate (Q8 vectors, HNSW graph): within about 0.02 of the true cosine, and a search may
    rarely miss a neighbour. LRU order comes from each gateway's wall clock (clocks a few ms apart order uses a
    few ms apart arbitrarily).
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
        self._prefix = prefix
        self._vs = f"{prefix}:vs:"
        self._size = f"{prefix}:size"
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
        # EVALSHA, loading the script again after a Redis restart emptied its script cache
        self._add = self._client.register_script(redis_lua.ADD)
        self._touch = self._client.register_script(redis_lua.TOUCH)
        self._invalidate = self._client.register_script(redis_lua.INVALIDATE)

    async def add(self, scope: Scope, vector: np.ndarray, entry: Entry, quota: int = 0) -> None:
        blob = self._blob(vector)
        if quota < 0:
            raise ValueError(f"quota must be 0 (none) or positive, got {quota}")
        e = entry  # ensure_ascii (json's default) keeps lone surrogates, which UTF-8 cannot carry
        attrs = json.dumps({"q": e.query, "a": e.answer, "t": e.completion_tokens, "c": e.created, "exp": e.expires})
        expire_ms = math.ceil(entry.expires * 1000)
        args: list[bytes | str | float] = [self._prefix, scope.tenant, scope.key, entry.id, blob, attrs, expire_ms]
        args += [time.time(), entry.expires, quota, self.max_entries, SWEEP_BATCH, EVICT_WINDOW]
        async with self._guard():
            await self._add(args=args)

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
            await self._touch(args=[self._prefix, scope.tenant, f"{scope.key}|{entry_id}", time.time()])

    async def invalidate(self, tenant: str, model: str | None = None) -> int:
        """Drop the tenant's scopes (of `model` only, if given); returns the entries their vector sets held."""
        scopes = f"{tenant}:{model}:" if model is not None else f"{tenant}:"
        async with self._guard():
            # SCAN too: a vector set the bookkeeping does not know (an older layout's) is the tenant's all the same
            pattern = self._vs + _glob(scopes) + "*"
            keys = {k async for k in self._client.scan_iter(match=pattern, count=SCAN_COUNT)}
            return int(await self._invalidate(keys=sorted(keys), args=[self._prefix, tenant, scopes]))

    async def count(self) -> int:
        async with self._guard():
            return int(await self._client.get(self._size) or 0)

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
