"""Sessions that outlive their connection, and responses resumed after a dropped connection: WebSocket
(`?session_id=`, `response.resume`) and SSE (`Last-Event-ID`), with real clients against the live gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from blink.gateway.sessions import RedisSessions
from tests.e2e.test_realtime import recv, until
from tests.redis_server import RedisServer
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer, bearer, make_keys
from tests.unit.gateway.test_realtime import open_session, send, user_item

Serve = Callable[..., LiveServer]
REPLY = tuple(f" w{i}" for i in range(30))


def slow_replica() -> FakeReplica:
    return FakeReplica(MODEL, reply=REPLY, delay=0.02)


async def deltas_until_done(ws: ClientConnection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    done, seen = await until(ws, "response.done")
    return [e for e in seen if e["type"] == "response.output_text.delta"], done


def test_a_websocket_client_that_reconnects_resumes_its_response_without_loss_or_repeat(serve: Serve) -> None:
    server = serve(slow_replica())

    async def main() -> None:
        ws, session = await open_session(server)
        await send(ws, user_item("Tell me a story."))
        await until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        created, _ = await until(ws, "response.created")
        response_id = created["response"]["id"]
        first = [(await until(ws, "response.output_text.delta"))[0] for _ in range(4)]
        assert [e["delta_index"] for e in first] == [0, 1, 2, 3]
        await ws.close()  # the connection drops mid-stream
        await asyncio.sleep(0.1)

        async with connect(f"{server.ws_url}?session_id={session['id']}") as ws2:
            created2 = await recv(ws2)
            assert created2["type"] == "session.created" and created2["session"]["id"] == session["id"]
            await send(ws2, {"type": "response.resume", "response_id": response_id, "after": 2})  # lost delta 3
            rest, done = await deltas_until_done(ws2)
            assert [e["delta_index"] for e in rest] == list(range(3, len(REPLY)))
            text = "".join(e["delta"] for e in first[:3] + rest)
            assert text == "".join(REPLY)
            assert done["response"]["status"] == "completed" and done["response"]["id"] == response_id
            assert done["response"]["output"][0]["content"][0]["text"] == text
            # the answer joined the session's conversation: the next response sees both turns
            await send(ws2, user_item("And then?"))
            await until(ws2, "conversation.item.done")
            await send(ws2, {"type": "response.create"})
            await until(ws2, "response.done")
        messages = server.replicas[0].requests[-1].messages
        assert messages is not None
        assert [(m["role"], m["content"]) for m in messages] == [
            ("user", "Tell me a story."),
            ("assistant", "".join(REPLY)),
            ("user", "And then?"),
        ]

    asyncio.run(main())
    assert server.errors == []


def test_resume_is_for_the_same_key_only_and_a_foreign_session_is_not_found(serve: Serve, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", "alice", "mallory")
    server = serve(slow_replica(), api_keys=str(tmp_path / "keys.json"))
    alice, mallory = bearer(keys["alice"]), bearer(keys["mallory"])

    async def main() -> None:
        async with connect(server.ws_url, additional_headers=alice) as ws:
            session = (await recv(ws))["session"]
            await send(ws, user_item("Private question."))
            await send(ws, {"type": "response.create"})
            created, _ = await until(ws, "response.created")
            async with connect(server.ws_url, additional_headers=mallory) as other:
                await recv(other)
                await send(other, {"type": "response.resume", "response_id": created["response"]["id"], "after": -1})
                error = await recv(other)
                assert error["type"] == "error" and error["error"]["code"] == "response_not_found"
                await send(other, {"type": "response.resume", "response_id": "resp-nope", "after": "x"})
                error = await recv(other)
                assert error["error"]["code"] == "invalid_request" and error["error"]["param"] == "after"
            await until(ws, "response.done")
        for headers, wanted in ((mallory, session["id"]), (alice, "sess-" + "0" * 24)):
            async with connect(f"{server.ws_url}?session_id={wanted}", additional_headers=headers) as ws:
                error = await recv(ws)
                assert error["type"] == "error" and error["error"]["code"] == "session_not_found"
                try:
                    await recv(ws)
                    raise AssertionError("the connection stayed open")
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1008

    asyncio.run(main())
    assert server.errors == []


def start_and_drop(server: LiveServer) -> str:
    """Start a response over a new connection, close the connection once it started; its id."""

    async def main() -> str:
        async with connect(server.ws_url) as ws:
            await recv(ws)
            await send(ws, user_item("hi"))
            await send(ws, {"type": "response.create"})
            created, _ = await until(ws, "response.created")
        return str(created["response"]["id"])

    return asyncio.run(main())


def wait_inactive(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.gateway.num_active:
        assert time.monotonic() < deadline, "the abandoned response was never cancelled"
        time.sleep(0.02)


def test_a_response_nobody_resumes_is_cancelled_after_the_window(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica, resume_window_s=2)
    response_id = start_and_drop(server)
    assert server.gateway.num_active == 1  # still running: the client may come back
    wait_inactive(server, 10)
    assert replica.held == []  # the replica was told to stop

    async def late() -> dict[str, Any]:
        await asyncio.sleep(2.5)  # past the window after its end: forgotten
        async with connect(server.ws_url) as ws:
            await recv(ws)
            await send(ws, {"type": "response.resume", "response_id": response_id, "after": -1})
            return await recv(ws)

    assert asyncio.run(late())["error"]["code"] == "response_not_found"


def test_with_no_window_a_dropped_connection_cancels_at_once(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica, resume_window_s=0)
    start_and_drop(server)
    wait_inactive(server, 2)
    assert replica.held == []


def sse_data(lines: list[str]) -> list[Any]:
    return [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines if x.startswith("data: ")]


def test_an_sse_client_resumes_with_last_event_id_and_gets_the_rest_once(serve: Serve, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", "k", "other")
    server = serve(slow_replica(), api_keys=str(tmp_path / "keys.json"))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}
    headers = bearer(keys["k"])
    got: list[str] = []
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, headers=headers, timeout=10) as r:
        lines = r.iter_lines()
        while len([x for x in got if x.startswith("data: ")]) < 5:
            got.append(next(lines))
    ids = [x[4:] for x in got if x.startswith("id: ")]
    assert ids[0].endswith(":-1") and ids[1].endswith(":0")  # the opening chunk, then delta 0
    last = ids[-2]  # as if the last event had been lost with the connection
    resumed = httpx.post(
        f"{server.base}/v1/chat/completions", json=body, headers={**headers, "Last-Event-ID": last}, timeout=10
    )
    assert resumed.status_code == 200
    before = [c["choices"][0]["delta"].get("content", "") for c in sse_data(got)[1:-1]]
    after = sse_data(resumed.text.splitlines())
    assert after[-1] == "[DONE]" and after[-2]["choices"][0]["finish_reason"] == "stop"
    rest = [c["choices"][0]["delta"].get("content", "") for c in after[:-2]]
    assert "".join(before + rest) == "".join(REPLY)
    # another key does not find it; a malformed id is a 400
    foreign = httpx.post(
        f"{server.base}/v1/chat/completions",
        json=body,
        headers={**bearer(keys["other"]), "Last-Event-ID": last},
        timeout=10,
    )
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "response_not_found"
    bad = httpx.post(
        f"{server.base}/v1/chat/completions", json=body, headers={**headers, "Last-Event-ID": "x"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    assert server.errors == []


def test_a_response_resumes_only_over_the_api_that_started_it(serve: Serve) -> None:
    """A realtime response id in Last-Event-ID, a chat completion's id in response.resume, a completion's id on
    /v1/chat/completions: each is a clean 'response_not_found' (never a stream in the wrong format, a 500 or a
    traceback), and the connection or session stays usable."""
    server = serve(slow_replica())
    headers = {"Authorization": "Bearer k"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}
    plain = {"model": MODEL, "prompt": "Once upon a time", "stream": True}

    def sse_id(path: str, body: dict[str, Any]) -> str:
        with httpx.stream("POST", f"{server.base}{path}", json=body, headers=headers, timeout=10) as r:
            return next(x[4:] for x in r.iter_lines() if x.startswith("id: ")).rpartition(":")[0]

    chat_id, completion_id = sse_id("/v1/chat/completions", chat), sse_id("/v1/completions", plain)

    async def main() -> str:
        async with connect(server.ws_url, additional_headers=headers) as ws:
            await recv(ws)
            await send(ws, {"type": "response.resume", "response_id": chat_id, "after": -1, "event_id": "e1"})
            error = await recv(ws, 10)
            assert error["type"] == "error", error
            assert error["error"]["code"] == "response_not_found" and error["error"]["event_id"] == "e1"
            await send(ws, user_item("hi"))  # the session goes on
            await until(ws, "conversation.item.done")
            await send(ws, {"type": "response.create"})
            created, _ = await until(ws, "response.created")
            await until(ws, "response.done")
            return str(created["response"]["id"])

    realtime_id = asyncio.run(main())
    for path, body, foreign in (
        ("/v1/chat/completions", chat, f"{realtime_id}:0"),
        ("/v1/completions", plain, f"{realtime_id}:-1"),
        ("/v1/chat/completions", chat, f"{completion_id}:0"),
        ("/v1/completions", plain, f"{chat_id}:0"),
    ):
        got = httpx.post(f"{server.base}{path}", json=body, headers={**headers, "Last-Event-ID": foreign}, timeout=10)
        assert got.status_code == 404, (path, foreign, got.status_code, got.text[:300])
        assert got.json()["error"]["code"] == "response_not_found"
    # each API still resumes its own
    own = httpx.post(
        f"{server.base}/v1/chat/completions", json=chat, headers={**headers, "Last-Event-ID": f"{chat_id}:0"}
    )
    assert own.status_code == 200 and sse_data(own.text.splitlines())[-1] == "[DONE]"
    assert server.errors == []


def test_a_session_id_that_is_not_one_blink_gave_out_is_refused_before_redis_is_touched(
    serve: Serve, redis_server: RedisServer, redis_prefix: str
) -> None:
    """On Redis a session is `<prefix>session:<id>` and its items `<prefix>session:<id>:items`: a client naming
    `<id>:items` (or anything with ':', '*', spaces) gets a clean error, never a Redis error or a traceback."""
    server = serve(session_store=RedisSessions(redis_server.url, 60, prefix=redis_prefix + ":"))

    async def main() -> None:
        ws, session = await open_session(server)
        await send(ws, user_item("Remember me."))
        await until(ws, "conversation.item.done")
        await ws.close()
        for wanted in (f"{session['id']}:items", "*", "sess-%20x", "x" * 5000):
            async with connect(f"{server.ws_url}?session_id={wanted}") as bad:
                error = await recv(bad, 10)
                assert error["type"] == "error", error
                assert error["error"]["code"] == "invalid_request" and error["error"]["param"] == "session_id"
                try:
                    await recv(bad, 10)
                    raise AssertionError("the connection stayed open")
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1008
        async with connect(f"{server.ws_url}?session_id={session['id']}") as again:  # the session is intact
            created = await recv(again)
            assert created["type"] == "session.created" and created["session"]["id"] == session["id"]

    asyncio.run(main())
    assert server.errors == []
