"""The realtime protocol with a real `websockets` client against the live gateway (scripted replicas)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from blink.bus.messages import ReplicaState
from tests.e2e.test_realtime import recv, until
from tests.unit.gateway.conftest import MODEL, OTHER, FakeReplica, LiveServer

Serve = Callable[..., LiveServer]


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event, ensure_ascii=False))


def user_item(text: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


async def open_session(server: LiveServer) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(server.ws_url, max_size=None)
    created = await recv(ws)
    assert created["type"] == "session.created"
    return ws, created["session"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("€" * 400, id="400-characters-1200-bytes"),  # under the limit if one counted characters
        pytest.param("x" * 3500, id="under-uvicorn-ws-max-size"),  # the server reads it, then refuses it
    ],
)
def test_an_event_over_the_limit_in_utf8_bytes_gets_an_error_event_not_a_close(serve: Serve, text: str) -> None:
    server = serve(max_request_bytes=1000)

    async def main() -> None:
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item(text))
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "request_too_large"
            await send(ws, user_item("€" * 100))  # 300 bytes: fine, and the session is still open
            assert (await recv(ws))["type"] == "conversation.item.added"

    asyncio.run(main())


def test_an_event_far_over_the_limit_closes_with_1009_and_the_server_lives_on(serve: Serve) -> None:
    server = serve(max_request_bytes=1000)

    async def main() -> None:
        ws, _ = await open_session(server)
        await send(ws, user_item("x" * 5000))
        with pytest.raises(ConnectionClosedError) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item("hello"))
            assert (await recv(ws))["type"] == "conversation.item.added"

    asyncio.run(main())
    assert httpx.get(f"{server.base}/healthz").status_code == 200
    assert server.errors == []


def test_response_create_runs_on_the_model_it_names(serve: Serve) -> None:
    a, b = FakeReplica(MODEL), FakeReplica(OTHER)
    server = serve(a, b)

    async def main() -> None:
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item("hi"))
            await until(ws, "conversation.item.done")
            await send(ws, {"type": "response.create", "response": {"model": OTHER}})
            await until(ws, "response.done")
            await send(ws, {"type": "response.create", "event_id": "evt_9", "response": {"model": "nope"}})
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "model_not_found"
            assert error["error"]["param"] == "response.model" and error["error"]["event_id"] == "evt_9"
            await send(ws, {"type": "response.create"})  # the override was for one response only
            await until(ws, "response.done")

    asyncio.run(main())
    assert [r.model for r in b.requests] == [OTHER] and [r.model for r in a.requests] == [MODEL]


def test_session_update_checks_max_output_tokens_against_the_model_it_switches_to(serve: Serve) -> None:
    server = serve(FakeReplica(MODEL, max_model_len=100), FakeReplica(OTHER, max_model_len=4000))

    async def main() -> None:
        ws, session = await open_session(server)
        async with ws:
            assert session["model"] == MODEL
            await send(ws, {"type": "session.update", "session": {"model": OTHER, "max_output_tokens": 2000}})
            updated = await recv(ws)
            assert updated["type"] == "session.updated", updated
            assert (updated["session"]["model"], updated["session"]["max_output_tokens"]) == (OTHER, 2000)
            await send(ws, {"type": "session.update", "session": {"model": MODEL, "max_output_tokens": 2000}})
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["param"] == "session.max_output_tokens"
            await send(ws, user_item("hi"))
            await until(ws, "conversation.item.done")
            # a per-response override is checked against the response's model too
            await send(ws, {"type": "response.create", "response": {"model": MODEL, "max_output_tokens": 2000}})
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["param"] == "response.max_output_tokens"

    asyncio.run(main())


def test_response_done_reports_tokens_in_usage_and_the_prompts_story_in_timings(serve: Serve) -> None:
    server = serve()

    async def main() -> None:
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item("hi"))
            await send(ws, {"type": "response.create"})
            done, _ = await until(ws, "response.done")
            response = done["response"]
            assert response["usage"]["input_tokens"] == 7
            timings = response["timings"]
            assert {"ttft_ms", "total_ms", "decode_ms", "preload_stop_ms", "retrieval_ms"} <= set(timings)
            assert timings["prompt_tokens"] == 7 and timings["cached_tokens"] == 0
            assert timings["preloaded"] is False and timings["preload_predicted"] is False

    asyncio.run(main())


def test_the_default_temperature_is_one_as_on_http(serve: Serve) -> None:
    replica = FakeReplica(MODEL)
    server = serve(replica)

    async def main() -> None:
        ws, session = await open_session(server)
        async with ws:
            assert session["temperature"] == 1.0
            await send(ws, user_item("hi"))
            await send(ws, {"type": "response.create"})
            await until(ws, "response.done")

    asyncio.run(main())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{server.base}/v1/chat/completions", json=body).status_code == 200
    assert [r.sampling.temperature for r in replica.requests] == [1.0, 1.0]


def test_a_replica_that_stops_mid_response_ends_it_incomplete_not_cancelled(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica)

    async def main() -> None:
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item("hi"))
            await send(ws, {"type": "response.create"})
            await until(ws, "response.created")
            server.call(lambda: replica.stop(server.bus))
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] == "incomplete"
            assert done["response"]["status_details"]["reason"] == "server_shutdown"

    asyncio.run(main())


def test_readiness_is_checked_after_the_event_is_validated(serve: Serve) -> None:
    server = serve(FakeReplica(MODEL, state=ReplicaState.WARMING))

    async def main() -> None:
        ws, _ = await open_session(server)
        async with ws:
            await send(ws, user_item("hi"))
            await until(ws, "conversation.item.done")
            await send(ws, {"type": "response.create", "response": {"temperature": 9}})
            assert (await recv(ws))["error"]["code"] == "invalid_request"
            await send(ws, {"type": "response.create"})
            assert (await recv(ws))["error"]["code"] == "model_not_ready"

    asyncio.run(main())
