"""The unmodified `openai` SDK's realtime client (`client.realtime.connect`) holds a text conversation with a
real blink server and its real model (OpenAI Realtime GA, text modality)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openai import AsyncOpenAI

from tests.e2e.conftest import MODEL, Server

pytestmark = pytest.mark.slow


def test_the_openai_sdk_holds_a_two_turn_conversation_and_the_second_reuses_the_first(server: Server) -> None:
    async def turn(conn: Any, text: str) -> tuple[Any, list[Any]]:
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        )
        await conn.response.create(response={"max_output_tokens": 24})
        events = []
        while True:
            event = await asyncio.wait_for(conn.recv(), 120)
            events.append(event)
            if event.type in ("response.done", "error"):
                return event, events

    async def main() -> None:
        client = AsyncOpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
        async with client.realtime.connect(model=MODEL) as conn:
            await conn.session.update(
                session={"type": "realtime", "instructions": "You are a helpful assistant.", "temperature": 0}
            )
            first, events = await turn(conn, "What is the capital of France?")
            assert first.type == "response.done" and first.response.status in ("completed", "incomplete")
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert deltas and deltas == first.response.output[0].content[0].text
            second, _ = await turn(conn, "And of Italy?")
            assert second.type == "response.done", second
            usage = second.response.usage
            # the second prompt starts with the first turn: the prefix cache holds most of it
            assert usage.input_tokens > usage.input_token_details.cached_tokens > 0

    asyncio.run(main())
