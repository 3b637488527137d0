"""Vector indexes for the semantic cache: one Protocol, an in-memory and a Redis 8 Vector Sets implementation
(tests/contract/test_cache_index.py runs the same contract against each).

A scope is a hard partition: `search` only ever sees entries `add`ed under an equal Scope. The policy layer
(semantic_cache/cache.py) builds scopes from tenant, model, instructions, sampling and history; an index never
looks inside them and never mixes them (separate matrices in memory, separate keys in Redis).

Contract every index gives:
- `add` stores (or replaces, by `entry.id`) an entry with its unit-length vector in `scope`.
- `search` returns at most `k` unexpired entries of `scope` (expires > now), best first, with their cosine
  similarity (in [-1, 1]; an index that quantises may be approximate, within about 0.02).
- Room is shared between tenants (`scope.tenant`) by one rule; `touch` marks an entry used, `add` counts as a use.
  After storing, `add(scope, vector, entry, quota)`:
  1. quota: if `quota` > 0, evicts the least recently used entries of `scope.tenant` (over all its scopes) until
     it holds at most `quota` (the entry just added, the most recently used, stays). Only the adding tenant's
     entries go in this step. `quota` 0: the tenant has no quota of its own.
  2. cap: while more than `max_entries` are stored in all, evicts the least recently used entry of the tenant
     holding the most entries (a tie: of the one among them whose least recently used entry is the oldest).
  So another tenant's traffic evicts a tenant's entry only in step 2, and only while that tenant holds at least
  as many entries as any other, i.e. more than max_entries / (number of tenants holding entries): a tenant
  within that share keeps its entries whatever the others store. When every tenant stores with a quota and the
  quotas sum to at most `max_entries`, step 2 never evicts anything and no tenant loses an entry to another's
  traffic. A quota lowered between adds is restored at the tenant's next adds (an index may spread a large
  eviction over several adds: RedisIndex evicts at most EVICT_WINDOW entries per step per add). Expired entries
  are swept whoever they belong to; that is expiry, not eviction.
- `invalidate(tenant, model)` drops every scope of a tenant (of one model only if `model` is given) and returns
  how many entries went.
- A backend that cannot be reached raises CacheUnavailable (never a transport's own exception), and works again
  once the backend is back, without being re-created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Scope:
    """A partition of the cache. Each part is an opaque digest (hex, no ':'), so keys never hold a tenant's API
    key, a prompt or a model name in clear."""

    tenant: str
    model: str
    digest: str  # everything else that must match: instructions, sampling, conversation so far

    @property
    def key(self) -> str:
        return f"{self.tenant}:{self.model}:{self.digest}"


@dataclass(frozen=True)
class Entry:
    id: str
    query: str  # the user's text whose answer this is (the verification step compares it to a new query)
    answer: str
    completion_tokens: int
    created: float  # unix seconds
    expires: float  # unix seconds


@dataclass(frozen=True)
class Candidate:
    entry: Entry
    similarity: float  # cosine, in [-1, 1]


class VectorIndex(Protocol):
    name: str  # "memory", "redis": reported in logs and metrics

    async def add(self, scope: Scope, vector: np.ndarray, entry: Entry, quota: int = 0) -> None:
        """Store `entry` under `scope`; `vector` is float32 [dim], unit length. `quota`: the entries
        `scope.tenant` may hold (0: no quota of its own; negative: ValueError); see the eviction rule above."""
        ...

    async def search(self, scope: Scope, vector: np.ndarray, k: int, now: float) -> list[Candidate]: ...

    async def touch(self, scope: Scope, entry_id: str) -> None:
        """Mark the entry used (LRU eviction keeps it longer); an unknown id is ignored."""
        ...

    async def invalidate(self, tenant: str, model: str | None = None) -> int: ...

    async def count(self) -> int:
        """Entries stored over every scope (expired ones not yet swept may be included)."""
        ...

    async def close(self) -> None: ...
