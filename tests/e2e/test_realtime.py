"""The realtime WebSocket protocol with a real `websockets` client against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.conftest import MODEL, Server

pytestmark = pytest.mark.slow


async def recv(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))  # type: ignore[no-any-return]


async def until(ws: ClientConnection, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read events until one of type `kind`; return it and everything before it."""
    seen = []
    while True:
        event = await recv(ws)
        if event["type"] == kind:
            return event, seen
        seen.append(event)


async def ask(ws: ClientConnection, text: str, **response: Any) -> None:
    await ws.send(
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
            }
        )
    )
    await until(ws, "conversation.item.done")
    await ws.send(json.dumps({"type": "response.create", "response": response}))


async def session(server: Server, **settings: Any) -> ClientConnection:
    ws = await connect(server.ws_url)
    created = await recv(ws)
    assert created["type"] == "session.created"
    if settings:
        await ws.send(json.dumps({"type": "session.update", "session": settings}))
        updated, _ = await until(ws, "session.updated")
        assert all(updated["session"][k] == v for k, v in settings.items())
    return ws


def test_streamed_deltas_match_the_http_answer_and_history_is_kept(server: Server) -> None:
    question = "What is the capital of France?"

    async def main() -> None:
        async with await session(server, temperature=0, max_output_tokens=30) as ws:
            await ask(ws, question)
            done, before = await until(ws, "response.done")
            deltas = [e["delta"] for e in before if e["type"] == "response.output_text.delta"]
            (text_done,) = [e for e in before if e["type"] == "response.output_text.done"]
            assert before[0]["type"] == "response.created" and len(deltas) > 2
            assert "".join(deltas) == text_done["text"] == done["response"]["output"][0]["content"][0]["text"]
            assert done["response"]["status"] in ("completed", "incomplete")
            usage, timings = done["response"]["usage"], done["response"]["timings"]
            assert usage["output_tokens"] > 2 and timings["ttft_ms"] > 0

            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": 30,
            }
            http = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60).json()
            assert http["choices"][0]["message"]["content"] == text_done["text"]

            # the second turn is answered with the first in its prompt
            await ask(ws, "And of Italy?")
            second, _ = await until(ws, "response.done")
            assert second["response"]["usage"]["input_tokens"] > usage["input_tokens"] + usage["output_tokens"]

    asyncio.run(main())


def test_cancel_after_first_delta_frees_the_sequence(server: Server) -> None:
    async def main() -> None:
        async with await session(server, temperature=0.7, seed=3) as ws:
            await ask(ws, "Write a very long story about a dragon.", max_output_tokens=1500)
            await until(ws, "response.output_text.delta")
            await ws.send(json.dumps({"type": "response.cancel"}))
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["usage"]["output_tokens"] < 1500
        server.wait_idle()

    asyncio.run(main())


def test_eight_concurrent_sessions_complete_with_interleaved_tokens(server: Server) -> None:
    topics = ["cats", "the sea", "mountains", "coffee", "trains", "rain", "music", "stars"]

    async def one(topic: str) -> list[float]:
        async with await session(server, temperature=0, max_output_tokens=24) as ws:
            await ask(ws, f"Write two sentences about {topic}.")
            stamps = []
            while True:
                event = await recv(ws, 120)
                if event["type"] == "response.output_text.delta":
                    stamps.append(time.monotonic())
                elif event["type"] == "response.done":
                    assert event["response"]["status"] in ("completed", "incomplete")
                    return stamps

    async def main() -> list[list[float]]:
        return list(await asyncio.gather(*(one(t) for t in topics)))

    results = asyncio.run(main())
    assert all(len(r) >= 3 for r in results)
    # batched, not one after another: every session's first token comes before any session's last one
    assert max(r[0] for r in results) < min(r[-1] for r in results)


BAD_EVENTS = [
    ("{not json", "invalid_json"),
    ("[1, 2, 3]", "invalid_json"),
    ('{"no_type": 1}', "invalid_event"),
    ('{"type": "made.up"}', "unknown_event_type"),
    ('{"type": "session.update"}', "invalid_request"),
    ('{"type": "session.update", "session": {"temperature": "hot"}}', "invalid_request"),
    ('{"type": "session.update", "session": {"max_output_tokens": 0}}', "invalid_request"),
    ('{"type": "session.update", "session": {"model": "nope"}}', "model_not_found"),
    ('{"type": "conversation.item.create", "item": {"role": "user"}}', "invalid_request"),
    (
        '{"type": "conversation.item.create", "item": {"role": "user", '
        '"content": [{"type": "input_text", "text": " "}]}}',
        "empty_message",
    ),
    ('{"type": "response.create"}', "empty_conversation"),
    ('{"type": "response.cancel"}', "response_cancel_not_active"),
]


def test_bad_events_get_errors_and_the_session_keeps_working(server: Server) -> None:
    async def main() -> None:
        async with await session(server) as ws:
            for raw, code in BAD_EVENTS:
                await ws.send(raw)
                event = await recv(ws)
                assert event["type"] == "error" and event["error"]["code"] == code, (raw, event)
            await ws.send(b"\x00\x01binary")
            event = await recv(ws)
            assert event["type"] == "error" and event["error"]["code"] == "binary_frame"
            await ws.send(json.dumps({"type": "made.up", "event_id": "evt_7"}))
            assert (await recv(ws))["error"]["event_id"] == "evt_7"
            await ws.send(json.dumps({"type": "session.update", "session": {"temperature": 0}}))
            await until(ws, "session.updated")
            await ask(ws, "Say hello.", max_output_tokens=5)
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] in ("completed", "incomplete")

    asyncio.run(main())


def test_too_long_prompt_and_concurrent_response_are_errors(server: Server) -> None:
    async def main() -> None:
        async with await session(server, temperature=0.7) as ws:
            await ask(ws, "word " * 5000)
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "context_length_exceeded"
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Tell a story."}],
                        },
                    }
                )
            )
        async with await session(server, temperature=0.7) as ws:
            await ask(ws, "Write a long story.", max_output_tokens=400)
            await ws.send(json.dumps({"type": "response.create"}))
            error, _ = await until(ws, "error")
            assert error["error"]["code"] == "conversation_already_has_active_response"
            await ws.send(json.dumps({"type": "response.cancel"}))
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] in ("cancelled", "completed", "incomplete")
        server.wait_idle()

    asyncio.run(main())


def test_client_that_vanishes_mid_stream_frees_its_sequence(server: Server) -> None:
    async def main() -> None:
        ws = await session(server, temperature=0.7)
        await ask(ws, "Write a very long story about the ocean.", max_output_tokens=1500)
        await until(ws, "response.output_text.delta")
        ws.transport.abort()  # no close frame: the TCP connection just drops

    asyncio.run(main())
    server.wait_idle()  # once the server's resume window (3 s here) passed with nobody resuming


def test_a_dropped_connection_resumes_its_session_and_response_with_the_same_greedy_text(server: Server) -> None:
    question = "Describe a quiet morning in a small fishing village."
    settings = {"temperature": 0, "max_output_tokens": 60, "cache": False}

    async def main() -> None:
        async with await session(server, **settings) as ws:
            await ask(ws, question)
            done, _ = await until(ws, "response.done")
            whole = done["response"]["output"][0]["content"][0]["text"]
        ws = await connect(server.ws_url)
        session_id = (await recv(ws))["session"]["id"]
        await ws.send(json.dumps({"type": "session.update", "session": settings}))
        await until(ws, "session.updated")
        await ask(ws, question)
        created, _ = await until(ws, "response.created")
        got = [(await until(ws, "response.output_text.delta"))[0] for _ in range(3)]
        ws.transport.abort()  # the connection drops without a close frame
        async with connect(f"{server.ws_url}?session_id={session_id}") as ws2:
            assert (await recv(ws2))["session"]["id"] == session_id
            resume = {"type": "response.resume", "response_id": created["response"]["id"], "after": 1}
            await ws2.send(json.dumps(resume))  # as if delta 2 had been lost with the connection
            done, before = await until(ws2, "response.done")
            rest = [e for e in before if e["type"] == "response.output_text.delta"]
            assert [e["delta_index"] for e in got[:2] + rest] == list(range(2 + len(rest)))
            assert "".join(e["delta"] for e in got[:2] + rest) == whole
            assert done["response"]["status"] in ("completed", "incomplete")

    asyncio.run(main())


def test_an_event_over_the_limit_in_utf8_bytes_is_refused_and_the_session_stays_open(server: Server) -> None:
    text = "€" * 400_000  # 400,000 characters, 1.2 MB: over the default 1 MiB --max-request-bytes

    async def main() -> None:
        async with await session(server) as ws:
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}, ensure_ascii=False))
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "request_too_large"
            await ask(ws, "Say hello.", max_output_tokens=3)
            done, _ = await until(ws, "response.done")
            assert done["response"]["status"] in ("completed", "incomplete")

    asyncio.run(main())
