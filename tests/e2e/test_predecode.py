"""Pre-decode over a real WebSocket: a draft left still is answered before the user submits it, and the answer is
the one a cold run gives."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from tests.e2e.conftest import Server
from tests.e2e.test_preload import draft, type_out
from tests.e2e.test_realtime import ask, session, until

pytestmark = pytest.mark.slow

QUESTION = "Which river runs through the old town, and how many bridges cross it?"


async def parked(server: Server, count: int = 1, timeout: float = 30) -> None:
    """Wait until the replicas hold `count` pre-decodes with their tokens (a heartbeat says so)."""
    deadline = time.monotonic() + timeout
    while sum(r["parked"] for r in (await asyncio.to_thread(server.readyz))["replicas"]) < count:
        assert time.monotonic() < deadline, "no pre-decode parked"
        await asyncio.sleep(0.05)


async def answer(ws: ClientConnection, text: str, **response: Any) -> dict[str, Any]:
    await ask(ws, text, **response)
    done, _ = await until(ws, "response.done")
    return done["response"]  # type: ignore[no-any-return]


def text_of(response: dict[str, Any]) -> str:
    return response["output"][0]["content"][0]["text"]  # type: ignore[no-any-return]


def predecode_tokens(server: Server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.base + "/metrics").text.splitlines():
        if line.startswith("blink_predecode_tokens_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 0.8, "seed": 11}],
    ids=["greedy", "seeded"],
)
def test_a_still_draft_is_answered_before_the_submit_and_the_answer_is_a_cold_runs(
    server: Server, sampling: dict[str, Any]
) -> None:
    instructions = f"You are a city guide. Answer in one sentence. (tour {uuid.uuid4().hex[:8]})"
    settings = {"instructions": instructions, "max_output_tokens": 24, **sampling}

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await session(server, **settings)
        try:
            await type_out(ws, QUESTION)
            await parked(server)  # the user paused: the answer's first tokens are decoded
            warm = await answer(ws, QUESTION)
        finally:
            await ws.close()
        plain = await session(server, **settings)  # no drafts: the reference answer
        try:
            return await answer(plain, QUESTION), warm
        finally:
            await plain.close()

    before = predecode_tokens(server)
    cold, warm = asyncio.run(main())
    assert text_of(warm) == text_of(cold)
    assert warm["timings"]["predecoded_tokens"] >= 2 and cold["timings"]["predecoded_tokens"] == 0
    assert warm["usage"]["output_tokens"] == cold["usage"]["output_tokens"]
    after = predecode_tokens(server)
    assert after["adopted"] - before.get("adopted", 0) == warm["timings"]["predecoded_tokens"]
    server.wait_idle()


def test_typing_on_after_a_pause_wastes_the_pre_decode_and_holds_nothing(server: Server) -> None:
    async def main() -> dict[str, Any]:
        ws = await session(server, temperature=0, max_output_tokens=12)
        try:
            await type_out(ws, QUESTION[:30])
            await parked(server)
            await type_out(ws, QUESTION, start=31)  # typed on: the parked tokens answer another question
            return await answer(ws, QUESTION)
        finally:
            await ws.close()

    before = predecode_tokens(server)
    response = asyncio.run(main())
    assert response["status"] in ("completed", "incomplete")  # incomplete: max_output_tokens
    after = predecode_tokens(server)
    assert after["wasted"] > before.get("wasted", 0)
    state = server.wait_idle()
    deadline = time.monotonic() + 15
    while sum(r["parked"] for r in state["replicas"]):  # the session closed: its pre-decodes are freed
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
        state = server.readyz()


def test_a_response_with_other_settings_does_not_take_the_pre_decode(server: Server) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await session(server, temperature=0, max_output_tokens=12)
        try:
            await type_out(ws, QUESTION)
            await parked(server)
            other = await answer(ws, QUESTION, temperature=0.7, seed=3)  # not what was pre-decoded
        finally:
            await ws.close()
        plain = await session(server, max_output_tokens=12)
        try:
            return other, await answer(plain, QUESTION, temperature=0.7, seed=3)
        finally:
            await plain.close()

    other, reference = asyncio.run(main())
    assert other["timings"]["predecoded_tokens"] == 0
    assert text_of(other) == text_of(reference)


def test_a_draft_cleared_after_the_pause_abandons_the_pre_decode(server: Server) -> None:
    async def main() -> None:
        ws = await session(server, temperature=0, max_output_tokens=12)
        try:
            await type_out(ws, QUESTION)
            await parked(server)
            await draft(ws, "")
        finally:
            await ws.close()

    asyncio.run(main())
    server.wait_idle()


def test_a_pre_decode_is_adopted_while_another_stream_decodes(server: Server) -> None:
    """The submit arrives while the engine steps for someone else: the parked tokens go out during the step."""
    settings = {"instructions": f"Answer briefly. ({uuid.uuid4().hex[:8]})", "temperature": 0, "max_output_tokens": 16}

    async def busy() -> None:
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True, "cache": False}  # fmt: skip
        url = server.base + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=120) as client, client.stream("POST", url, json=body) as response:
            async for _ in response.aiter_lines():
                pass

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await session(server, **settings)
        other = asyncio.create_task(busy())
        try:
            await type_out(ws, QUESTION)
            await parked(server)
            assert not other.done()  # still streaming: the submit lands while it steps
            warm = await answer(ws, QUESTION)
        finally:
            await ws.close()
            await other
        plain = await session(server, **settings)
        try:
            return await answer(plain, QUESTION), warm
        finally:
            await plain.close()

    cold, warm = asyncio.run(main())
    assert warm["timings"]["predecoded_tokens"] >= 2
    assert text_of(warm) == text_of(cold)
    server.wait_idle(timeout=60)
