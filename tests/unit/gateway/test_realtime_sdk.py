"""OpenAI Realtime GA conformance, text modality: the unmodified `openai` SDK's realtime client
(`client.realtime.connect`) against the live gateway (scripted replicas; tests/e2e/test_realtime_sdk.py runs it
against the real model)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from tests.unit.gateway.conftest import MODEL, OTHER, FakeReplica, LiveServer, make_keys

Serve = Callable[..., LiveServer]
USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}
# a text response's events in order, as OpenAI's Realtime API (GA) sends them
LIFECYCLE = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


def client(server: LiveServer, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0)


async def until(conn: AsyncRealtimeConnection, kind: str) -> tuple[Any, list[Any]]:
    """Read typed events until one of type `kind`; it and everything before it."""
    seen: list[Any] = []
    while True:
        event = await asyncio.wait_for(conn.recv(), 10)
        if event.type == kind:
            return event, seen
        seen.append(event)


def test_the_sdk_runs_a_text_conversation_with_the_ga_event_lifecycle(serve: Serve) -> None:
    server = serve(FakeReplica(MODEL), FakeReplica(OTHER))

    async def main() -> None:
        async with client(server).realtime.connect(model=OTHER) as conn:
            created, _ = await until(conn, "session.created")
            assert created.session.type == "realtime" and created.session.model == OTHER  # ?model= chose it
            assert created.session.output_modalities == ["text"] and created.event_id
            await conn.session.update(session={"type": "realtime", "model": MODEL, "instructions": "Be brief."})
            updated, _ = await until(conn, "session.updated")
            assert updated.session.model == MODEL and updated.session.instructions == "Be brief."

            await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
            added, _ = await until(conn, "conversation.item.added")
            done, _ = await until(conn, "conversation.item.done")
            assert added.item.id == done.item.id and done.item.content[0].text == "Say hello."

            await conn.response.create()
            finished, events = await until(conn, "response.done")
            assert [e.type for e in [*events, finished]] == LIFECYCLE
            deltas = [e for e in events if e.type == "response.output_text.delta"]
            text_done = next(e for e in events if e.type == "response.output_text.done")
            assert "".join(d.delta for d in deltas) == text_done.text == "Hello there"
            response = finished.response
            assert response.status == "completed" and response.output[0].content[0].text == "Hello there"
            assert response.conversation_id == created.session.id
            assert response.usage.input_token_details.cached_tokens == 0
            assert response.usage.output_tokens == 2 and response.usage.total_tokens == 9
            assert len({e.event_id for e in events}) == len(events)  # each server event has its own id

            # the answer is a conversation item: retrieve it, delete it
            answer_id = response.output[0].id
            await conn.conversation.item.retrieve(item_id=answer_id)
            retrieved, _ = await until(conn, "conversation.item.retrieved")
            assert retrieved.item.role == "assistant" and retrieved.item.content[0].text == "Hello there"
            await conn.conversation.item.delete(item_id=answer_id)
            deleted, _ = await until(conn, "conversation.item.deleted")
            assert deleted.item_id == answer_id
            await conn.conversation.item.retrieve(item_id=answer_id, event_id="again")
            error, _ = await until(conn, "error")
            assert error.error.code == "item_not_found" and error.error.event_id == "again"

    asyncio.run(main())
    prompts = [r.messages for r in server.replicas[0].requests]
    assert prompts == [({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."})]
    assert server.errors == []


def test_an_out_of_band_response_reads_its_own_input_and_leaves_the_conversation_alone(serve: Serve) -> None:
    server = serve()

    async def main() -> None:
        async with client(server).realtime.connect(model=MODEL) as conn:
            await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
            item, _ = await until(conn, "conversation.item.done")
            await conn.response.create(
                response={
                    "conversation": "none",
                    "metadata": {"topic": "classify"},
                    "input": [
                        {"type": "item_reference", "id": item.item.id},
                        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Topic?"}]},
                    ],
                }
            )
            finished, events = await until(conn, "response.done")
            assert not any(e.type.startswith("conversation.item") for e in events)
            assert finished.response.conversation_id is None
            assert finished.response.metadata == {"topic": "classify"}
            # the conversation holds only the user's message: the next response does not see the side answer
            await conn.response.create()
            await until(conn, "response.done")

    asyncio.run(main())
    first, second = (r.messages for r in server.replicas[0].requests)
    assert [m["content"] for m in first or ()] == ["Say hello.", "Topic?"]
    assert [m["content"] for m in second or ()] == ["Say hello."]


def test_audio_events_get_a_typed_error_and_limits_arrive_as_rate_limits_updated(serve: Serve, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", "alice", requests_per_minute=100)
    server = serve(api_keys=str(tmp_path / "keys.json"))

    async def main() -> None:
        async with client(server, keys["alice"]).realtime.connect(model=MODEL) as conn:
            await conn.input_audio_buffer.append(audio="AAAA", event_id="a1")
            error, _ = await until(conn, "error")
            assert error.error.code == "audio_not_supported" and error.error.event_id == "a1"
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
            error, _ = await until(conn, "error")
            assert error.error.code == "audio_not_supported"
            await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
            await conn.response.create()
            limits, _ = await until(conn, "rate_limits.updated")
            requests = next(limit for limit in limits.rate_limits if limit.name == "requests")
            assert requests.limit == 100 and requests.remaining == 99
            await until(conn, "response.done")

    asyncio.run(main())
    assert server.errors == []
