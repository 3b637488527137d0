"""The session store contract (gateway/sessions.py), run against every store: in memory and a real Redis
(tests/redis_server.py, each test on its own key prefix). A session id comes from the client (`?session_id=`), so
one that blink could not have given out is refused before any key is touched: on Redis it must never name another
key (`<id>:items` is the items list of session <id>)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis as syncredis

from blink.errors import InvalidRequest
from blink.gateway.sessions import MemorySessions, RedisSessions, SessionRecord, SessionStore
from tests.redis_server import RedisServer

GOOD = "sess-0123456789abcdef01234567"
OTHER = "sess-fedcba9876543210fedcba98"


class Stores:
    """Makes stores of one kind and reads back everything a store holds (to show what a call touched)."""

    def __init__(self, url: str | None, prefix: str) -> None:
        self.url, self.prefix = url, prefix

    def make(self) -> SessionStore:
        if self.url is None:
            return MemorySessions(ttl=60)
        return RedisSessions(self.url, ttl=60, prefix=self.prefix)

    def keyspace(self, store: SessionStore) -> Any:
        """Every key of the prefix with its type and value (Redis), or every record (memory)."""
        if self.url is None:
            assert isinstance(store, MemorySessions)
            return {k: (r.tenant, dict(r.settings), list(r.items)) for k, (_, r) in store._records.items()}
        raw = syncredis.Redis.from_url(self.url)
        try:
            out = {}
            for key in sorted(raw.scan_iter(match=self.prefix + "*")):
                kind = raw.type(key)
                out[key] = (kind, raw.hgetall(key) if kind == b"hash" else raw.lrange(key, 0, -1))
            return out
        finally:
            raw.close()


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Stores:
    if request.param == "memory":
        return Stores(None, "")
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    return Stores(server.url, prefix + ":")


def run(stores: Stores, body: Callable[[SessionStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = stores.make()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_session_round_trips_for_its_tenant_only(stores: Stores) -> None:
    async def body(store: SessionStore) -> None:
        await store.create(GOOD, SessionRecord("alice", {"model": "m"}))
        await store.append_item(GOOD, {"id": "item-1"})
        await store.save_settings(GOOD, {"model": "n"})
        got = await store.load(GOOD, "alice")
        assert got is not None and got.settings == {"model": "n"} and got.items == [{"id": "item-1"}]
        assert await store.load(GOOD, "mallory") is None
        assert await store.load(OTHER, "alice") is None

    run(stores, body)


def test_deleting_an_item_removes_that_item_only(stores: Stores) -> None:
    async def body(store: SessionStore) -> None:
        await store.create(GOOD, SessionRecord("alice", {"model": "m"}))
        for item_id in ("item-1", "item-2", "item-3"):
            await store.append_item(GOOD, {"id": item_id, "text": "same"})
        await store.delete_item(GOOD, "item-2")
        await store.delete_item(GOOD, "item-9")  # none such: nothing changes
        got = await store.load(GOOD, "alice")
        assert got is not None and [i["id"] for i in got.items] == ["item-1", "item-3"]

    run(stores, body)


MALFORMED = [
    f"{GOOD}:items",  # the items list of a real session
    "x:items",
    "*",
    "sess-*",
    "sess-0123456789abcdef0123456?",
    "a b",
    "",
    "sess-" + "0" * 23,
    "sess-" + "0" * 25,
    "sess-0123456789ABCDEF01234567",  # blink gives out lower-case hex only
    "sess-" + "a" * 100_000,
    "sess-0123456789abcdef01234567\n",
    "séss-0123456789abcdef01234567",
    "../sess-0123456789abcdef01234567",
]


@pytest.mark.parametrize("wanted", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_session_id_is_refused_and_touches_no_key(stores: Stores, wanted: str) -> None:
    async def body(store: SessionStore) -> None:
        await store.create(GOOD, SessionRecord("alice", {"model": "m"}, [{"id": "item-1"}]))
        before = stores.keyspace(store)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.load(wanted, "alice"),
            lambda: store.save_settings(wanted, {"model": "x"}),
            lambda: store.append_item(wanted, {"id": "item-2"}),
            lambda: store.delete_item(wanted, "item-1"),
            lambda: store.create(wanted, SessionRecord("alice", {})),
        ]
        for call in calls:
            with pytest.raises(InvalidRequest) as caught:
                await call()
            assert caught.value.param == "session_id" and "sess-" in caught.value.message
            assert len(caught.value.message) < 200  # the id is not echoed back
        assert stores.keyspace(store) == before
        got = await store.load(GOOD, "alice")
        assert got is not None and got.items == [{"id": "item-1"}]

    run(stores, body)
