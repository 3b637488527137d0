"""Predictive pre-loading over a real WebSocket: drafts prefill the KV cache before the user submits."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from tests.e2e.conftest import Server
from tests.e2e.test_realtime import ask, recv, session, until

pytestmark = pytest.mark.slow

INSTRUCTIONS = "You are a museum guide. Answer visitors' questions about the exhibits in one or two sentences. " * 3
QUESTION = "Which room holds the oldest painting in the collection, and who painted it?"


async def draft(ws: ClientConnection, text: str, **extra: Any) -> None:
    await ws.send(json.dumps({"type": "input_text.draft", "text": text, **extra}))


async def type_out(ws: ClientConnection, text: str, pause: float = 0.0, start: int = 1) -> None:
    """One draft per keystroke (from `start` characters typed), as a client that does not debounce sends them."""
    for i in range(start, len(text) + 1):
        await draft(ws, text[:i])
        if pause:
            await asyncio.sleep(pause)


async def answer(ws: ClientConnection, text: str) -> dict[str, Any]:
    await ask(ws, text, temperature=0, max_output_tokens=16)
    done, _ = await until(ws, "response.done")
    return done["response"]  # type: ignore[no-any-return]


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def preloads_settled(server: Server, before: int, timeout: float = 60) -> None:
    """Wait until the replica computed pre-load tokens beyond `before` and stays idle for a while (the planner
    starts the next pre-load of a chain a moment after the previous one ends)."""
    deadline = time.monotonic() + timeout
    idle_since, last = None, -1
    while True:
        state = await asyncio.to_thread(server.readyz)
        computed = sum(r["background_prefill_tokens"] for r in state["replicas"])
        if computed > before and state["active_responses"] == 0 and computed == last:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.3:
                return
        else:
            idle_since = None
        last = computed
        assert time.monotonic() < deadline, f"pre-loads did not settle: {state}"
        await asyncio.sleep(0.05)


def background_tokens(server: Server) -> int:
    return sum(r["background_prefill_tokens"] for r in server.readyz()["replicas"])


def kv_in_use(server: Server) -> int:
    return sum(r["kv_blocks_in_use"] for r in server.readyz()["replicas"])


def test_drafts_preload_the_prompt_and_the_answer_is_unchanged(server: Server) -> None:
    instructions = f"{INSTRUCTIONS} (visit {uuid.uuid4().hex[:8]})"  # a prompt no earlier test cached

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await session(server, instructions=instructions)
        try:
            before = background_tokens(server)
            await type_out(ws, QUESTION[:-12], pause=0.01)  # typed all but the last words, then paused
            await preloads_settled(server, before)
            await type_out(ws, QUESTION, start=len(QUESTION) - 12)
            warm = await answer(ws, QUESTION)
        finally:
            await ws.close()
        plain = await session(server, instructions=instructions)  # no drafts: the reference answer
        try:
            return await answer(plain, QUESTION), warm
        finally:
            await plain.close()

    cold, warm = asyncio.run(main())
    assert warm["output"][0]["content"][0]["text"] == cold["output"][0]["content"][0]["text"]
    timings = warm["timings"]
    assert timings["preloaded"] is True and cold["timings"]["preloaded"] is False
    assert warm["usage"]["input_token_details"]["cached_tokens"] == timings["cached_tokens"]
    # the drafts computed all but the last words: the submit prefilled only the tail (and the last partial block)
    assert timings["prompt_tokens"] - timings["cached_tokens"] < 16 + 12
    for key in ("queue_ms", "prefill_ms", "ttft_ms"):
        assert timings[key] >= 0


def test_a_draft_rewritten_midway_leaves_no_blocks_held(server: Server) -> None:
    async def main() -> None:
        ws = await session(server)
        try:
            await type_out(ws, "Tell me about the history of the river port and its bridges")
            await asyncio.sleep(0.3)
            await draft(ws, "")
            await type_out(ws, "What time does the museum close on Sundays in winter")
            await asyncio.sleep(0.3)
        finally:
            await ws.close()  # the pre-load in flight is cancelled with the session

    asyncio.run(main())
    server.wait_idle()
    deadline = time.monotonic() + 15
    while kv_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv_in_use(server) == 0


def test_a_flood_of_drafts_is_absorbed_and_others_still_stream(server: Server) -> None:
    async def flood() -> int:
        ws = await session(server)
        sent = 0
        try:
            start = time.monotonic()
            while time.monotonic() - start < 3:
                for _ in range(100):
                    await draft(ws, f"draft number {sent} about the exhibits and their history")
                    sent += 1
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "response.cancel"}))  # still answered: the session is alive
            error, _ = await until(ws, "error")
            assert error["error"]["code"] == "response_cancel_not_active"
        finally:
            await ws.close()
        return sent

    async def other() -> float:
        ws = await session(server)
        try:
            start = time.monotonic()
            await ask(ws, "Say hello.", temperature=0, max_output_tokens=8)
            await until(ws, "response.done")
            return time.monotonic() - start
        finally:
            await ws.close()

    async def main() -> tuple[int, float]:
        flooding = asyncio.create_task(flood())
        await asyncio.sleep(0.5)
        took = await other()
        return await flooding, took

    asyncio.run(main())  # the first flood warms up whatever a flood allocates once
    before = rss_mb(server)
    sent, took = asyncio.run(main())
    assert sent >= 1000  # at least 1,000 draft events in ~3 s from one client
    assert took < 60  # served meanwhile (a generous bound: this is liveness, not speed)
    server.wait_idle()
    assert rss_mb(server) - before < 64  # nothing per draft is kept


def test_drafts_naming_another_or_a_closed_session_get_an_error(server: Server) -> None:
    async def main() -> None:
        first = await session(server)
        closed_id = await _session_id(first)
        await first.close()
        ws = await session(server)
        try:
            await draft(ws, "hello", session_id=closed_id, event_id="e1")
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "unknown_session"
            assert error["error"]["event_id"] == "e1"
            await draft(ws, "hello", session_id="sess-does-not-exist")
            assert (await recv(ws))["error"]["code"] == "unknown_session"
            await ws.send(json.dumps({"type": "input_text.draft", "text": 5}))
            assert (await recv(ws))["error"]["param"] == "text"
            await ws.send(json.dumps({"type": "context.open", "document_ids": ["no-such-document"]}))
            assert (await recv(ws))["error"]["code"] == "not_found"
        finally:
            await ws.close()

    asyncio.run(main())


async def _session_id(ws: ClientConnection) -> str:
    await ws.send(json.dumps({"type": "session.update", "session": {}}))
    updated, _ = await until(ws, "session.updated")
    return updated["session"]["id"]  # type: ignore[no-any-return]


def test_retrieval_builds_the_prompt_from_documents_and_preloads_it(server: Server) -> None:
    text = (
        "The Harbour Museum opened in 1898 in the old customs house.\n\n"
        "Its oldest painting, a view of the harbour from 1652, hangs in the East Room and was painted by "
        "Anna Vermeulen.\n\n"
        "The museum is open from ten to five, and closes at four on Sundays in winter."
    )
    created = httpx.post(f"{server.base}/v1/documents", json={"id": "museum", "text": text}, timeout=120)
    assert created.status_code == 201, created.text

    async def main() -> dict[str, Any]:
        ws = await session(server, instructions="Answer from the documents.")
        try:
            await ws.send(json.dumps({"type": "session.update", "session": {"retrieval": {"top_k": 2}}}))
            await until(ws, "session.updated")
            await ws.send(json.dumps({"type": "context.open", "document_ids": ["museum"]}))
            before = background_tokens(server)
            await type_out(ws, "Who painted the oldest painting in the ")
            await preloads_settled(server, before)
            return await answer(ws, "Who painted the oldest painting in the museum?")
        finally:
            await ws.close()

    response = asyncio.run(main())
    timings = response["timings"]
    assert timings["preloaded"] is True and timings["preload_predicted"] is True
    assert timings["cached_tokens"] >= 32
    assert httpx.delete(f"{server.base}/v1/documents/museum", timeout=10).status_code == 200
