"""Every Redis client of blink (the bus, the session store, the semantic cache index) against a real Redis that
requires a password, over plain TCP and over TLS (rediss://), and what a client of blink is told when that Redis
fails: never its host, port or password (the log gets the detail, the password masked)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from blink.bus.messages import Finished, FinishStatus, GenerateRequest, Sampling, TokenEvent
from blink.bus.redis import RedisBus
from blink.config import CacheConfig, GatewayConfig
from blink.errors import NotReady
from blink.gateway.app import create_app
from blink.gateway.service import Gateway
from blink.gateway.sessions import RedisSessions, SessionRecord
from blink.semantic_cache.cache import SemanticCache
from blink.semantic_cache.index import Entry, Scope
from blink.semantic_cache.redis import RedisIndex
from tests.redis_server import RedisServer, TlsProxy, free_port

PASSWORD = "pw-" + uuid.uuid4().hex
WRONG = "not-" + uuid.uuid4().hex
SESSION = "sess-0123456789abcdef01234567"


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def tls(locked: RedisServer) -> Iterator[TlsProxy]:
    with TlsProxy(locked.port) as proxy:
        yield proxy


def with_password(url: str) -> str:
    return url.replace("://", f"://:{PASSWORD}@", 1)


async def use_every_client(url: str, password: str | None) -> None:
    """A request and its answer through the bus, a session stored and read back, a cache entry found again."""
    prefix = f"blink-test:{uuid.uuid4().hex[:12]}"
    gateway = RedisBus(url, password=password, prefix=prefix + ":bus")
    replica = RedisBus(url, password=password, prefix=prefix + ":bus")
    sessions = RedisSessions(url, 60, prefix=prefix + ":", password=password)
    index = RedisIndex(url, 10, prefix=prefix + ":cache", timeout_s=5, password=password)
    try:
        stream = await gateway.submit(GenerateRequest("r1", "m", Sampling(max_tokens=4), prompt="hi"))
        got = await replica.receive("m", "rep", wait=5, max_requests=1)
        assert [w.request_id for w in got] == ["r1"]
        assert await replica.publish(TokenEvent("r1", 0, "hello", 1))
        assert await replica.publish(Finished("r1", FinishStatus.STOP, 1, 1))
        events = [e async for e in stream]
        assert [type(e) for e in events] == [TokenEvent, Finished]
        await sessions.create(SESSION, SessionRecord("alice", {"model": "m"}))
        record = await sessions.load(SESSION, "alice")
        assert record is not None and record.settings == {"model": "m"}
        vector = np.ones(384, np.float32) / np.sqrt(384)
        scope = Scope("t", "m", "d")
        await index.add(scope, vector, Entry("e1", "q", "a", 1, time.time(), time.time() + 60))
        assert [c.entry.id for c in await index.search(scope, vector, 1, time.time())] == ["e1"]
    finally:
        for bus in (gateway, replica):
            await bus.close()
        await sessions.close()
        await index.close()


@pytest.mark.parametrize("where", ["argument", "url"])
def test_every_client_authenticates_with_the_password_apart_from_or_in_the_url(locked: RedisServer, where: str) -> None:
    if where == "argument":
        asyncio.run(use_every_client(locked.url, PASSWORD))
    else:
        asyncio.run(use_every_client(with_password(locked.url), None))


@pytest.mark.parametrize("where", ["argument", "url"])
def test_every_client_works_over_tls_with_rediss(tls: TlsProxy, where: str) -> None:
    """The certificate is checked (ssl_ca_certs in the URL's query): this is TLS, not a plain connection."""
    if where == "argument":
        asyncio.run(use_every_client(tls.url, PASSWORD))
    else:
        asyncio.run(use_every_client(with_password(tls.url), None))


def assert_anonymous(message: str, port: int) -> None:
    """A message a client of blink may see: it names neither the Redis nor its password."""
    for secret in (PASSWORD, "127.0.0.1", str(port), "redis://", "***"):
        assert secret not in message, message


def test_a_refused_password_is_not_ready_and_no_client_message_names_the_redis(
    locked: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        url = with_password(locked.url).replace(PASSWORD, WRONG)
        bus = RedisBus(url, timeout_s=1)
        sessions = RedisSessions(locked.url, 60, password=WRONG)
        try:
            with pytest.raises(NotReady) as caught:
                await bus.submit(GenerateRequest("r1", "m", Sampling(max_tokens=4), prompt="hi"))
            assert_anonymous(caught.value.message, locked.port)
            with pytest.raises(NotReady) as caught:
                await sessions.load(SESSION, "alice")
            assert_anonymous(caught.value.message, locked.port)
        finally:
            await bus.close()
            await sessions.close()

    with caplog.at_level(logging.WARNING, logger="blink"):
        asyncio.run(main())
    logged = caplog.text
    assert f"redis at redis://:***@127.0.0.1:{locked.port}/0" in logged  # the operator learns which Redis
    assert f"redis at redis://127.0.0.1:{locked.port}/0" in logged
    assert WRONG not in logged and PASSWORD not in logged


def test_an_unreachable_redis_is_reported_to_clients_without_its_host(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none"

    async def main() -> None:
        bus = RedisBus(url, timeout_s=0.2)
        sessions = RedisSessions(url, 60)
        index = RedisIndex(url, 10)
        cache = SemanticCache(index, lambda: None, CacheConfig())
        gateway = Gateway(bus, GatewayConfig(), ["m"], cache=cache, session_store=sessions)
        try:
            with pytest.raises(NotReady) as caught:
                await bus.submit(GenerateRequest("r1", "m", Sampling(max_tokens=4), prompt="hi"))
            assert_anonymous(caught.value.message, port)
            with pytest.raises(NotReady) as caught:
                await sessions.create(SESSION, SessionRecord("alice", {}))
            assert_anonymous(caught.value.message, port)
            transport = httpx.ASGITransport(app=create_app(gateway))
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                answer = await client.delete("/v1/cache")
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "cache_unavailable"
            assert_anonymous(answer.text, port)
        finally:
            await bus.close()
            await sessions.close()
            await index.close()

    with caplog.at_level(logging.WARNING, logger="blink"):
        asyncio.run(main())
    assert f"rediss://:***@127.0.0.1:{port}/0?ssl_cert_reqs=none" in caplog.text
    assert PASSWORD not in caplog.text
