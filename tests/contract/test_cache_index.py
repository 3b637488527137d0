"""The VectorIndex contract (blink.semantic_cache.index), run against every backend; Redis is the real server
(tests/redis_server.py), never a fake. The Redis-only tests at the end kill and freeze their own server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from blink.errors import CacheUnavailable
from blink.semantic_cache.index import Entry, Scope, VectorIndex
from blink.semantic_cache.memory import MemoryIndex
from blink.semantic_cache.redis import RedisIndex
from tests.redis_server import RedisServer

DIM = 384
TOLERANCE = {"memory": 1e-5, "redis": 0.02}  # Redis stores Q8 vectors
Factory = Callable[..., VectorIndex]
S = Scope("t1", "m1", "d1")


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_index(backend: str, request: pytest.FixtureRequest) -> Factory:
    if backend == "memory":
        return lambda max_entries=1000: MemoryIndex(max_entries, DIM)
    server: RedisServer = request.getfixturevalue("redis_server")  # started only when a Redis test runs
    prefix: str = request.getfixturevalue("redis_prefix")
    return lambda max_entries=1000: RedisIndex(server.url, max_entries, DIM, prefix=prefix)


def with_index(make: Factory, body: Callable[[VectorIndex], Awaitable[None]], max_entries: int = 1000) -> None:
    """Run `body` on a fresh index in its own event loop, closing the index even when an assert fails."""

    async def main() -> None:
        index = make(max_entries=max_entries)
        try:
            await body(index)
        finally:
            await index.close()

    asyncio.run(main())


def unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    v = rng.standard_normal((n or 1, DIM)).astype(np.float32)  # [n, DIM]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v if n is not None else v[0]


def entry(eid: str | None = None, *, ttl: float = 3600.0, query: str = "q", answer: str = "a") -> Entry:
    now = time.time()
    return Entry(eid or uuid.uuid4().hex, query, answer, 7, now, now + ttl)


async def ids(index: VectorIndex, scope: Scope, v: np.ndarray, k: int = 10, now: float | None = None) -> list[str]:
    return [c.entry.id for c in await index.search(scope, v, k, time.time() if now is None else now)]


def test_search_returns_best_first_with_cosine_similarity(make_index: Factory, backend: str) -> None:
    rng = np.random.default_rng(0)
    vs = unit(rng, 20)
    q = unit(rng)

    async def body(index: VectorIndex) -> None:
        for i, v in enumerate(vs):
            await index.add(S, v, entry(f"{i:02x}"))
        got = await index.search(S, q, 5, time.time())
        true = vs @ q  # [20]
        assert [c.entry.id for c in got] == [f"{i:02x}" for i in np.argsort(-true)[:5]]
        for c in got:
            assert abs(c.similarity - float(true[int(c.entry.id, 16)])) < TOLERANCE[backend]
        assert [c.similarity for c in got] == sorted((c.similarity for c in got), reverse=True)
        self_match = await index.search(S, vs[3], 1, time.time())
        assert self_match[0].entry.id == "03" and self_match[0].similarity > 1 - TOLERANCE[backend]
        assert len(await index.search(S, q, 100, time.time())) == 20
        assert await index.search(S, q, 0, time.time()) == []
        assert await index.count() == 20

    with_index(make_index, body)


def test_scopes_are_hard_partitions(make_index: Factory) -> None:
    v = unit(np.random.default_rng(1))
    scopes = [S, Scope("t2", "m1", "d1"), Scope("t1", "m2", "d1"), Scope("t1", "m1", "d2")]

    async def body(index: VectorIndex) -> None:
        for i, scope in enumerate(scopes):
            await index.add(scope, v, entry(f"e{i}"))
        for i, scope in enumerate(scopes):
            assert await ids(index, scope, v) == [f"e{i}"]
        assert await ids(index, Scope("t3", "m1", "d1"), v) == []

    with_index(make_index, body)


def test_add_with_the_same_id_replaces_vector_and_entry(make_index: Factory, backend: str) -> None:
    rng = np.random.default_rng(2)
    old, new = unit(rng), unit(rng)

    async def body(index: VectorIndex) -> None:
        await index.add(S, old, entry("x", answer="old"))
        await index.add(S, new, entry("x", answer="new"))
        [hit] = await index.search(S, new, 5, time.time())
        assert hit.entry.answer == "new" and hit.similarity > 1 - TOLERANCE[backend]
        [hit] = await index.search(S, old, 5, time.time())
        assert abs(hit.similarity - float(old @ new)) < TOLERANCE[backend]
        assert await index.count() == 1

    with_index(make_index, body)


def test_expired_entries_are_never_returned_and_are_swept(make_index: Factory) -> None:
    rng = np.random.default_rng(3)
    v = unit(rng)
    t = time.time()

    async def body(index: VectorIndex) -> None:
        await index.add(S, v, entry("short", ttl=10))
        await index.add(S, v, entry("long", ttl=100))
        await index.add(S, v, entry("past", ttl=-1))
        assert sorted(await ids(index, S, v, now=t)) == ["long", "short"]
        assert await ids(index, S, v, now=t + 50) == ["long"]
        assert await ids(index, S, v, now=t + 1000) == []

    with_index(make_index, body)


def test_an_add_sweeps_expired_entries(make_index: Factory) -> None:
    rng = np.random.default_rng(10)

    async def body(index: VectorIndex) -> None:
        await index.add(S, unit(rng), entry("past", ttl=-1))
        await index.add(Scope("t1", "m1", "other"), unit(rng), entry("fresh"))
        assert await index.count() == 1

    with_index(make_index, body)


def test_least_recently_used_entries_are_evicted_past_max_entries(make_index: Factory) -> None:
    rng = np.random.default_rng(4)
    a, b, c, d = unit(rng, 4)
    other = Scope("t1", "m9", "d9")  # the cap counts every scope of a tenant

    async def body(index: VectorIndex) -> None:
        await index.add(S, a, entry("a"))
        await index.add(other, b, entry("b"))
        await index.add(S, c, entry("c"))
        await index.touch(S, "a")
        await index.touch(S, "unknown")  # ignored
        await index.add(S, d, entry("d"))
        assert await index.count() == 3
        assert await ids(index, other, b) == []
        assert sorted(await ids(index, S, a)) == ["a", "c", "d"]
        await index.add(S, b, entry("e"))  # "c" is now the least recently used
        assert sorted(await ids(index, S, a)) == ["a", "d", "e"]

    with_index(make_index, body, max_entries=3)


def test_eviction_keeps_every_remaining_entry_findable(make_index: Factory) -> None:
    rng = np.random.default_rng(11)
    vs = unit(rng, 200)

    async def body(index: VectorIndex) -> None:
        for i, v in enumerate(vs):  # each add past 50 evicts the oldest (memory: moves another row into its place)
            await index.add(S, v, entry(f"{i:x}"))
        assert await index.count() == 50
        for i in range(150, 200):
            assert (await ids(index, S, vs[i], k=1)) == [f"{i:x}"]
        assert len(await ids(index, S, vs[0], k=100)) == 50

    with_index(make_index, body, max_entries=50)


A, B, C = Scope("ta", "m1", "d1"), Scope("tb", "m1", "d1"), Scope("tc", "m1", "d1")  # three tenants


async def held(index: VectorIndex, scope: Scope, rng: np.random.Generator) -> list[str]:
    return sorted(await ids(index, scope, unit(rng), k=100))


def test_a_tenant_storing_far_past_its_quota_never_evicts_another_tenants_entries(make_index: Factory) -> None:
    rng = np.random.default_rng(12)

    async def body(index: VectorIndex) -> None:
        for i in range(3):
            await index.add(B, unit(rng), entry(f"b{i}"), quota=5)
        for i in range(40):  # four times the whole index: only its own quota's worth stays
            await index.add(A, unit(rng), entry(f"a{i:02}"), quota=5)
        assert await held(index, B, rng) == ["b0", "b1", "b2"]
        assert await held(index, A, rng) == [f"a{i}" for i in range(35, 40)]
        assert await index.count() == 8

    with_index(make_index, body, max_entries=10)


def test_a_tenant_at_its_quota_evicts_its_own_least_recently_used(make_index: Factory) -> None:
    rng = np.random.default_rng(13)

    async def body(index: VectorIndex) -> None:
        await index.add(B, unit(rng), entry("b-oldest"))  # the oldest entry of all, of another tenant
        for name in ("a1", "a2", "a3"):
            await index.add(A, unit(rng), entry(name), quota=3)
        await index.touch(A, "a1")
        await index.add(Scope("ta", "m2", "d2"), unit(rng), entry("a4"), quota=3)  # the quota spans its scopes
        assert await held(index, A, rng) == ["a1", "a3"]
        assert await held(index, Scope("ta", "m2", "d2"), rng) == ["a4"]
        assert await held(index, B, rng) == ["b-oldest"]
        await index.add(A, unit(rng), entry("a5"), quota=0)  # 0: no quota of its own (the cap still holds)
        assert await held(index, A, rng) == ["a1", "a3", "a5"]
        assert await index.count() == 5

    with_index(make_index, body)


def test_past_max_entries_the_largest_tenants_least_recently_used_goes(make_index: Factory) -> None:
    rng = np.random.default_rng(14)

    async def body(index: VectorIndex) -> None:
        for scope, name in ((A, "a1"), (B, "b1"), (A, "a2"), (B, "b2")):
            await index.add(scope, unit(rng), entry(name))
        await index.add(C, unit(rng), entry("c1"))  # A and B hold two each: A's least recent use is the older
        assert (await held(index, A, rng), await held(index, B, rng)) == (["a2"], ["b1", "b2"])
        for name in ("b1", "b2"):
            await index.touch(B, name)
        await index.add(C, unit(rng), entry("c2"))  # B and C hold two: C's c1 is used less recently than B's
        assert (await held(index, B, rng), await held(index, C, rng)) == (["b1", "b2"], ["c2"])
        await index.add(B, unit(rng), entry("b3"))  # B holds three: its own b1 goes, not A's a2, the oldest of all
        assert (await held(index, A, rng), await held(index, B, rng)) == (["a2"], ["b2", "b3"])
        assert await index.count() == 4

    with_index(make_index, body, max_entries=4)


def test_invalidate_drops_a_tenant_or_one_of_its_models(make_index: Factory) -> None:
    rng = np.random.default_rng(5)
    v = unit(rng)
    layout = {S: 1, Scope("t1", "m1", "d2"): 2, Scope("t1", "m2", "d1"): 3, Scope("t2", "m1", "d1"): 4}

    async def body(index: VectorIndex) -> None:
        for scope, n in layout.items():
            for i in range(n):
                await index.add(scope, unit(rng), entry(f"{scope.digest}{scope.model}{i}"))
        assert await index.count() == 10
        assert await index.invalidate("t1", "m1") == 3
        assert await index.count() == 7
        assert await ids(index, Scope("t1", "m1", "d2"), v) == []
        assert len(await ids(index, Scope("t1", "m2", "d1"), v)) == 3
        assert await index.invalidate("t1") == 3
        assert await index.invalidate("t1") == 0
        assert await index.invalidate("nobody", "m1") == 0
        assert len(await ids(index, Scope("t2", "m1", "d1"), v)) == 4
        assert await index.count() == 4

    with_index(make_index, body)


def test_text_round_trips_exactly(make_index: Factory) -> None:
    v = unit(np.random.default_rng(6))
    query = "He said \"hi\"\n\tthen: {'x': [1, 2]} \\ / 😀 é 中文 \x00 \u2028 \ud800"
    answer = "line 1\r\nline 2 — «ok» `code` </s>"

    async def body(index: VectorIndex) -> None:
        e = Entry("e1", query, answer, 42, 1_700_000_000.125, time.time() + 3600.5)
        await index.add(S, v, e)
        [hit] = await index.search(S, v, 1, time.time())
        assert hit.entry == e

    with_index(make_index, body)


def test_ten_thousand_entries_find_their_nearest(make_index: Factory, backend: str) -> None:
    rng = np.random.default_rng(7)
    n = 10_000 if backend == "memory" else 1_000  # Redis pays a round trip and an HNSW insert per add
    vs = unit(rng, n)

    async def body(index: VectorIndex) -> None:
        for i, v in enumerate(vs):
            await index.add(S, v, entry(f"{i:x}"))
        for i in rng.choice(n, 20, replace=False):
            q = vs[i] + 0.02 * unit(rng)
            q /= np.linalg.norm(q)
            got = await index.search(S, q, 3, time.time())
            assert got[0].entry.id == f"{i:x}"
            assert abs(got[0].similarity - float(vs[i] @ q)) < TOLERANCE[backend]

    with_index(make_index, body, max_entries=n)


def test_a_vector_of_the_wrong_size_is_rejected(make_index: Factory) -> None:
    async def body(index: VectorIndex) -> None:
        with pytest.raises(ValueError):
            await index.add(S, np.zeros(DIM + 1, np.float32), entry())
        with pytest.raises(ValueError):
            await index.search(S, np.zeros(DIM - 1, np.float32), 1, time.time())

    with_index(make_index, body)


# Redis only: several gateways share one index


def test_concurrent_gateways_keep_the_cap_and_every_quota(redis_server: RedisServer, redis_prefix: str) -> None:
    rng = np.random.default_rng(15)
    vectors = unit(rng, 4 * 60)
    tenants = [Scope(f"t{i}", "m1", "d1") for i in range(3)]
    quotas = [0, 6, 6]  # t0 has no quota of its own: it gets what the others leave of the cap

    async def gateway(g: int, index: VectorIndex) -> None:
        for i in range(60):  # interleaved with the other gateways' adds at every await
            await index.add(tenants[i % 3], vectors[60 * g + i], entry(f"g{g}-{i}"), quota=quotas[i % 3])

    async def main() -> None:
        gateways = [RedisIndex(redis_server.url, 20, DIM, prefix=redis_prefix) for _ in range(4)]
        try:
            await asyncio.gather(*(gateway(g, index) for g, index in enumerate(gateways)))
            held_by = [len(await held(gateways[0], scope, rng)) for scope in tenants]
            assert held_by == [8, 6, 6] and await gateways[0].count() == 20
            assert await gateways[1].invalidate("t0") == 8
            assert await gateways[2].count() == 12
        finally:
            for index in gateways:
                await index.close()

    asyncio.run(main())


# Redis only: the backend goes away and comes back


async def expect_unavailable(call: Awaitable[object]) -> float:
    started = time.monotonic()
    with pytest.raises(CacheUnavailable, match=r"^redis at redis://127\.0\.0\.1:\d+/0: "):
        await asyncio.wait_for(call, 10)  # a hang fails here, not at the per-test timeout
    return time.monotonic() - started


@pytest.mark.timeout(60)
def test_a_stopped_redis_raises_cache_unavailable_and_the_same_index_recovers() -> None:
    v = unit(np.random.default_rng(8))
    with RedisServer() as server:

        async def main() -> None:
            index = RedisIndex(server.url, 100, DIM, timeout_s=0.25)
            await index.add(S, v, entry("before"))
            server.stop()
            assert await expect_unavailable(index.add(S, v, entry())) < 5  # loose: refused at once, really
            assert await expect_unavailable(index.search(S, v, 1, time.time())) < 5
            await expect_unavailable(index.count())
            server.start()  # same port, empty (no persistence)
            assert await ids(index, S, v) == []
            await index.add(S, v, entry("after"))
            assert await ids(index, S, v) == ["after"]
            await index.close()

        asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_hung_redis_costs_about_timeout_s_then_the_same_index_recovers() -> None:
    v = unit(np.random.default_rng(9))
    with RedisServer() as server:

        async def main() -> None:
            index = RedisIndex(server.url, 100, DIM, timeout_s=0.25)
            await index.add(S, v, entry("e1"))
            server.pause()
            try:
                assert await expect_unavailable(index.search(S, v, 1, time.time())) < 5  # ~0.25 s; loose bound
                assert await expect_unavailable(index.add(S, v, entry())) < 5
            finally:
                server.resume()
            assert await ids(index, S, v) == ["e1"]
            await index.close()

        asyncio.run(main())
