"""Per-tenant limits: the limiter's arithmetic on a fake clock, then each limit on a live gateway with keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from blink.config import TenantLimits
from blink.errors import RateLimited
from blink.gateway.keys import Tenant
from blink.gateway.limits import Coalescer, Limiter
from tests.e2e.test_realtime import recv, until
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer, bearer, make_keys
from tests.unit.gateway.test_realtime import send, user_item

Serve = Callable[..., LiveServer]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(**limits: float) -> Tenant:
    return Tenant("t", TenantLimits(**{**TenantLimits.unlimited().__dict__, **limits}))


def test_requests_per_minute_is_a_bucket_that_refills_continuously() -> None:
    clock = Clock()
    limiter, t = Limiter(clock), tenant(requests_per_minute=60)
    for _ in range(60):
        limiter.admit(t).done(0)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(t)
    assert refused.value.type == "requests" and refused.value.retry_after == pytest.approx(1.0)
    assert limiter.headers(t)["x-ratelimit-remaining-requests"] == "0"
    clock.now += 1.0  # one request's worth refilled
    limiter.admit(t).done(0)
    with pytest.raises(RateLimited):
        limiter.admit(t)


def test_tokens_are_charged_when_a_response_ends_and_concurrency_is_given_back_once() -> None:
    clock = Clock()
    limiter, t = Limiter(clock), tenant(tokens_per_minute=600, max_concurrent_responses=2)
    first, second = limiter.admit(t), limiter.admit(t)
    with pytest.raises(RateLimited) as busy:
        limiter.admit(t)
    assert busy.value.type == "concurrent_responses"
    first.done(900)  # past the bucket: it goes below zero
    first.done(900)  # a second call changes nothing
    second.done(0)
    with pytest.raises(RateLimited) as spent:
        limiter.admit(t)
    assert spent.value.type == "tokens" and spent.value.retry_after == pytest.approx(30.1, abs=0.2)
    clock.now += 31
    limiter.admit(t)
    assert [x["name"] for x in limiter.rate_limits(t)] == ["tokens"]
    assert limiter.rate_limits(tenant()) == [] and limiter.headers(tenant()) == {}


def test_a_coalescer_runs_the_latest_call_and_never_queues_more_than_one() -> None:
    async def main() -> tuple[list[int], int]:
        ran: list[int] = []
        done = asyncio.Event()
        coalescer = Coalescer(4.0)  # 4 a second, a burst of 4
        for i in range(10):
            coalescer.offer(lambda i=i: (ran.append(i), i == 9 and done.set()))  # type: ignore[misc]
        await asyncio.wait_for(done.wait(), 5)
        return ran, coalescer.coalesced

    ran, coalesced = asyncio.run(main())
    assert ran == [0, 1, 2, 3, 9] and coalesced == 5  # the burst, then the latest; 4-8 replaced


@pytest.fixture
def limited(serve: Serve, tmp_path: Path) -> Callable[..., tuple[LiveServer, dict[str, str]]]:
    def start(*replicas: FakeReplica, **limits: float) -> tuple[LiveServer, dict[str, str]]:
        path = tmp_path / "keys.json"
        keys = make_keys(path, "small", **limits)
        keys |= make_keys(path, "other")
        return serve(*replicas, api_keys=str(path)), keys

    return start


def test_concurrent_responses_past_the_limit_get_429_and_another_tenant_is_not_affected(
    limited: Callable[..., tuple[LiveServer, dict[str, str]]],
) -> None:
    server, keys = limited(FakeReplica(MODEL, hold=True), max_concurrent_responses=1)
    url = f"{server.base}/v1/chat/completions"
    with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=bearer(keys["small"]), timeout=10) as held:
        assert held.status_code == 200
        refused = httpx.post(url, json=CHAT, headers=bearer(keys["small"]), timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "concurrent_responses"
        with httpx.stream(
            "POST", url, json={**CHAT, "stream": True}, headers=bearer(keys["other"]), timeout=10
        ) as other:
            assert other.status_code == 200
    assert server.errors == []


def test_requests_per_minute_past_the_limit_get_429_with_openai_headers(
    limited: Callable[..., tuple[LiveServer, dict[str, str]]],
) -> None:
    server, keys = limited(requests_per_minute=2)
    url = f"{server.base}/v1/chat/completions"
    first = httpx.post(url, json=CHAT, headers=bearer(keys["small"]), timeout=10)
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert httpx.post(url, json=CHAT, headers=bearer(keys["small"]), timeout=10).status_code == 200
    refused = httpx.post(url, json=CHAT, headers=bearer(keys["small"]), timeout=10)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert httpx.post(url, json=CHAT, headers=bearer(keys["other"]), timeout=10).status_code == 200


def test_sessions_and_conversations_are_bounded_per_tenant(
    limited: Callable[..., tuple[LiveServer, dict[str, str]]],
) -> None:
    server, keys = limited(max_sessions=1, max_session_items=2, requests_per_minute=100)

    async def main() -> None:
        async with connect(server.ws_url, additional_headers=bearer(keys["small"])) as ws:
            assert (await recv(ws))["type"] == "session.created"
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws_url, additional_headers=bearer(keys["small"])):
                    pass
            assert refused.value.response.status_code == 429
            assert json.loads(refused.value.response.body or b"{}")["error"]["type"] == "sessions"
            async with connect(server.ws_url, additional_headers=bearer(keys["other"])) as other:
                assert (await recv(other))["type"] == "session.created"
            await send(ws, user_item("one"))
            await until(ws, "conversation.item.done")
            await send(ws, {"type": "response.create"})
            _, seen = await until(ws, "response.done")
            limits = [e for e in seen if e["type"] == "rate_limits.updated"]
            assert limits and limits[0]["rate_limits"][0]["name"] == "requests"
            await send(ws, user_item("three"))  # the answer was the second item
            error, _ = await until(ws, "error")
            assert error["error"]["code"] == "conversation_full"
        # the session's slot is free again once it closed
        async with connect(server.ws_url, additional_headers=bearer(keys["small"])) as ws:
            assert (await recv(ws))["type"] == "session.created"

    asyncio.run(main())
    assert server.errors == []


def test_connections_past_the_global_cap_get_429(serve: Serve) -> None:
    server = serve(FakeReplica(MODEL, hold=True), max_connections=1)

    async def main() -> None:
        async with connect(server.ws_url) as ws:
            assert (await recv(ws))["type"] == "session.created"
            reply = httpx.get(f"{server.base}/healthz", timeout=10)
            assert reply.status_code == 429 and reply.json()["error"]["code"] == "overloaded"
        # the WebSocket's slot is given back when it closes (wait for that, never for time)
        for _ in range(200):
            if server.call(lambda: asyncio.sleep(0, result=server.gateway.num_active)) == 0:
                reply = httpx.get(f"{server.base}/healthz", timeout=10)
                if reply.status_code == 200:
                    return
            await asyncio.sleep(0.01)
        raise AssertionError("the connection slot was never given back")

    asyncio.run(main())
