"""The in-process VectorIndex: exact search, one float32 matrix per scope, one LRU per tenant over its scopes.

Nothing here awaits: the methods are async only to satisfy the Protocol, so each runs to completion without
yielding and needs no lock. Search is one matrix-vector product over the scope's rows (10,000 rows of 384
floats is well under a millisecond).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict

import numpy as np

from blink.semantic_cache.index import Candidate, Entry, Scope


class _Part:
    """One scope's entries: row i of `matrix` is the vector of `entries[i]`; rows [0, n) are live."""

    def __init__(self, scope: Scope, dim: int) -> None:
        self.scope = scope
        # most scopes (one per conversation state) hold a single entry: start at one row, not a block of them
        self.matrix = np.empty((1, dim), np.float32)  # [capacity, dim]
        self.expires = np.empty(1, np.float64)  # [capacity]
        self.entries: list[Entry] = []
        self.rows: dict[str, int] = {}  # entry id -> row

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, vector: np.ndarray, entry: Entry) -> None:
        row = self.rows.get(entry.id)
        if row is None:
            row = len(self.entries)
            if row == len(self.matrix):  # grow by doubling: amortised O(1) appends
                self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
                self.expires = np.concatenate([self.expires, np.empty_like(self.expires)])
            self.entries.append(entry)
            self.rows[entry.id] = row
        else:
            self.entries[row] = entry
        self.matrix[row] = vector
        self.expires[row] = entry.expires

    def remove(self, entry_id: str) -> None:
        """Drop an entry by moving the last row into its place (row order carries no meaning)."""
        row = self.rows.pop(entry_id)
        last = len(self.entries) - 1
        if row != last:
            moved = self.entries[last]
            self.entries[row] = moved
            self.matrix[row] = self.matrix[last]
            self.expires[row] = self.expires[last]
            self.rows[moved.id] = row
        self.entries.pop()
        if len(self.matrix) >= max(2, 4 * len(self.entries)):  # give memory back after a scope shrinks
            self.matrix = self.matrix[: len(self.matrix) // 2].copy()
            self.expires = self.expires[: len(self.expires) // 2].copy()


class MemoryIndex:
    """A VectorIndex held in this process (lost on restart, not shared between gateways).

    Entries expire lazily: `search` never returns one with expires <= now and drops those it meets; `add` sweeps
    every entry whose expiry has passed on the wall clock. `count` may include expired entries not yet swept.
    Finding the largest tenant at the cap looks at every tenant holding entries: O(tenants) per eviction.
    """

    name = "memory"

    def __init__(self, max_entries: int, dim: int = 384) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.dim = dim
        self._parts: dict[str, _Part] = {}  # scope.key -> part
        # tenant -> {(scope.key, id): use number}, least recent first; a tenant holding nothing has no item
        self._lru: dict[str, OrderedDict[tuple[str, str], int]] = {}
        self._uses = itertools.count()  # numbers uses across tenants: whose least recent use is older
        self._size = 0
        # (expires, scope.key, id) per add; an item whose entry was since replaced or removed is stale and skipped.
        self._expiry: list[tuple[float, str, str]] = []

    async def add(self, scope: Scope, vector: np.ndarray, entry: Entry, quota: int = 0) -> None:
        vector = self._check(vector)
        if quota < 0:
            raise ValueError(f"quota must be 0 (none) or positive, got {quota}")
        self._sweep(time.time())
        part = self._parts.get(scope.key)
        if part is None:
            part = self._parts[scope.key] = _Part(scope, self.dim)
        part.put(vector, entry)
        lru = self._lru.setdefault(scope.tenant, OrderedDict())
        self._size += (scope.key, entry.id) not in lru
        self._use(lru, (scope.key, entry.id))
        heapq.heappush(self._expiry, (entry.expires, scope.key, entry.id))
        while quota and len(lru) > quota:  # never empties `lru`: the entry just added is its most recent
            self._drop(*next(iter(lru)))
        while self._size > self.max_entries:
            largest = max(self._lru.values(), key=lambda t: (len(t), -next(iter(t.values()))))
            self._drop(*next(iter(largest)))
        if len(self._expiry) > 2 * self._size + 64:  # too many stale items: rebuild from the live entries
            self._expiry = [(e.expires, k, e.id) for k, p in self._parts.items() for e in p.entries]
            heapq.heapify(self._expiry)

    async def search(self, scope: Scope, vector: np.ndarray, k: int, now: float) -> list[Candidate]:
        vector = self._check(vector)
        part = self._parts.get(scope.key)
        if part is None or k <= 0:
            return []
        n = len(part)
        sims = part.matrix[:n] @ vector  # [n]
        live = part.expires[:n] > now  # [n]
        if not live.all():
            expired = [part.entries[i].id for i in np.flatnonzero(~live)]
            sims = np.where(live, sims, -np.inf)
        else:
            expired = []
        top = np.argpartition(-sims, k - 1)[:k] if n > k else np.arange(n)  # [min(n, k)], unordered
        best = top[np.argsort(-sims[top], kind="stable")]
        found = [Candidate(part.entries[i], float(sims[i])) for i in best if live[i]]
        for entry_id in expired:  # after reading rows: dropping one moves another row
            self._drop(scope.key, entry_id)
        return found

    async def touch(self, scope: Scope, entry_id: str) -> None:
        lru = self._lru.get(scope.tenant)
        if lru is not None and (scope.key, entry_id) in lru:
            self._use(lru, (scope.key, entry_id))

    async def invalidate(self, tenant: str, model: str | None = None) -> int:
        keys = [
            key
            for key, part in self._parts.items()
            if part.scope.tenant == tenant and (model is None or part.scope.model == model)
        ]
        dropped = 0
        for key in keys:
            part = self._parts.pop(key)
            dropped += len(part)
            for entry in part.entries:
                del self._lru[tenant][(key, entry.id)]
        if keys and not self._lru[tenant]:
            del self._lru[tenant]
        self._size -= dropped
        return dropped  # their items in _expiry are now stale: skipped by the sweep, gone at the next rebuild

    async def count(self) -> int:
        return self._size

    async def close(self) -> None:
        self._parts.clear()
        self._lru.clear()
        self._size = 0
        self._expiry.clear()

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {vector.shape}")
        return vector

    def _sweep(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, key, entry_id = heapq.heappop(self._expiry)
            part = self._parts.get(key)
            row = part.rows.get(entry_id) if part is not None else None
            if part is not None and row is not None and part.entries[row].expires == expires:
                self._drop(key, entry_id)

    def _use(self, lru: OrderedDict[tuple[str, str], int], item: tuple[str, str]) -> None:
        lru[item] = next(self._uses)
        lru.move_to_end(item)

    def _drop(self, key: str, entry_id: str) -> None:
        """Remove a stored entry from its part and its tenant's LRU."""
        part = self._parts[key]
        tenant = part.scope.tenant
        del self._lru[tenant][(key, entry_id)]
        if not self._lru[tenant]:
            del self._lru[tenant]
        self._size -= 1
        part.remove(entry_id)
        if not part.entries:
            del self._parts[key]
