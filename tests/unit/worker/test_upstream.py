"""`--engine openai`'s logic without a server: the requests it sends an upstream (httpx's MockTransport records
them), how it reads the upstream's stream and errors, and the upstream replica on the in-memory bus with an engine
that streams what the test says. tests/e2e/test_upstream_engine.py runs it against a real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest

from blink.bus.memory import MemoryBus
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, Sampling, TokenEvent
from blink.worker.engines.base import Delta, End, EngineLoad
from blink.worker.engines.openai import OpenAIUpstream
from blink.worker.upstream import UpstreamReplica

CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def upstream(answer: httpx.Response, sent: list[dict[str, Any]]) -> OpenAIUpstream:
    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(
            {"path": request.url.path, "traceparent": request.headers.get("traceparent"), **json.loads(request.content)}
        )
        return answer

    return OpenAIUpstream("http://up:8000/v1", "m", transport=httpx.MockTransport(handle))


async def collect(engine: OpenAIUpstream, request: GenerateRequest) -> list[Delta | End]:
    return [item async for item in engine.stream(request)]


def run(engine: OpenAIUpstream, request: GenerateRequest) -> list[Delta | End]:
    return asyncio.run(collect(engine, request))


CACHED = {"cached_tokens": 4}
STREAM = sse(
    {"choices": [{"delta": {"content": "Hel"}}]},
    {"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": CACHED}},
)


def test_a_chat_streams_its_deltas_then_ends_with_the_upstreams_usage() -> None:
    sent: list[dict[str, Any]] = []
    req = GenerateRequest("r", "m", Sampling(max_tokens=5, temperature=0.5, seed=3, stop=("x",)), messages=CHAT)
    items = run(upstream(httpx.Response(200, content=STREAM), sent), req)
    assert items == [Delta("Hel", 1), Delta("lo", 2), End(FinishStatus.LENGTH, 9, 2, 4)]
    body = sent[0]
    assert body["path"] == "/v1/chat/completions" and body["messages"] == list(CHAT) and body["model"] == "m"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (5, 0.5, 3, ["x"])
    assert "top_k" not in body and "ignore_eos" not in body and "cache_salt" not in body  # not asked for
    assert body["traceparent"] is None
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    run(
        upstream(httpx.Response(200, content=STREAM), sent),
        GenerateRequest("t", "m", Sampling(), messages=CHAT, traceparent=parent),
    )
    assert sent[1]["traceparent"] == parent  # the upstream's spans join the request's trace


def test_a_plain_prompt_goes_to_completions() -> None:
    sent: list[dict[str, Any]] = []
    stream = sse({"choices": [{"text": "Paris", "finish_reason": "stop"}]})
    items = run(upstream(httpx.Response(200, content=stream), sent), GenerateRequest("r", "m", Sampling(), prompt="Q"))
    assert items == [Delta("Paris", 1), End(FinishStatus.STOP, 0, 1, 0)]
    assert sent[0]["path"] == "/v1/completions" and sent[0]["prompt"] == "Q"


def test_a_preload_asks_for_one_token_of_the_conversation_as_typed_so_far() -> None:
    sent: list[dict[str, Any]] = []
    one = sse({"choices": [{"delta": {"content": "A"}, "finish_reason": "length"}]})  # its one token
    engine = upstream(httpx.Response(200, content=one), sent)
    draft = GenerateRequest("p", "m", Sampling(), messages=CHAT, prefill_only=True, open_last=True, priority=1)
    assert run(engine, draft) == [End(FinishStatus.STOP, 0, 1, 0)]  # its token is the upstream's, not the user's
    assert sent[0]["messages"] == list(CHAT) and sent[0]["max_tokens"] == 1 and sent[0]["temperature"] == 0


def test_each_tenant_gets_its_own_cache_salt_and_its_name_never_leaves() -> None:
    sent: list[dict[str, Any]] = []
    engine = upstream(httpx.Response(200, content=STREAM), sent)
    for tenant in ("acme", "globex", "acme"):
        run(engine, GenerateRequest("r", "m", Sampling(), messages=CHAT, tenant=tenant))
    salts = [s["cache_salt"] for s in sent]
    assert salts[0] == salts[2] != salts[1] and all("acme" not in s and "globex" not in s for s in salts)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, {"code": "context_length_exceeded", "message": "too long"}, "context_length_exceeded"),  # ours
        (400, {"type": "invalid_request_error", "message": "bad"}, "invalid_request"),  # theirs: by status
        (429, {"message": "slow down"}, "overloaded"),
        (500, {"message": "boom"}, "engine_failure"),
    ],
)
def test_the_upstreams_error_ends_the_request_with_a_code_the_gateway_knows(
    status: int, error: dict[str, Any], code: str
) -> None:
    answer = httpx.Response(status, json={"error": error})
    items = run(upstream(answer, []), GenerateRequest("r", "m", Sampling(), prompt="Q"))
    assert len(items) == 1 and isinstance(items[0], End)
    assert items[0].status is FinishStatus.ERROR and items[0].error_code == code
    assert error["message"] in (items[0].error_message or "")


def test_an_unreachable_upstream_is_an_engine_failure_not_an_exception() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    engine = OpenAIUpstream("http://up:8000", "m", transport=httpx.MockTransport(refuse))
    [end] = run(engine, GenerateRequest("r", "m", Sampling(), prompt="Q"))
    assert isinstance(end, End) and end.error_code == "engine_failure"
    assert engine.load().running == 0


class Scripted:
    """A StreamingEngine that streams `deltas`, each after the first once `gate` lets it, and records the streams
    closed."""

    name = "scripted"

    def __init__(self, deltas: list[str]) -> None:
        self.deltas, self.gate = deltas, asyncio.Event()
        self.closed: list[str] = []
        self.gate.set()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def healthy(self) -> bool:
        return True

    def load(self) -> EngineLoad:
        return EngineLoad(max_model_len=128)

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Delta | End, None]:
        try:
            for i, text in enumerate(self.deltas):
                if i:
                    await self.gate.wait()
                yield Delta(text, i + 1)
            yield End(FinishStatus.STOP, prompt_tokens=3, completion_tokens=len(self.deltas))
        finally:
            self.closed.append(request.request_id)


def with_replica(engine: Scripted, body: Any) -> None:
    async def main() -> None:
        bus = MemoryBus()
        replica = UpstreamReplica(bus, engine, "m", heartbeat_s=0.05)
        task = asyncio.create_task(replica.run())
        await asyncio.wait_for(replica.ready.wait(), 10)
        try:
            await body(bus)
        finally:
            await replica.stop()
            await task

    asyncio.run(main())


def test_the_replica_streams_the_engines_text_then_its_usage() -> None:
    async def body(bus: MemoryBus) -> None:
        events = [e async for e in await bus.submit(GenerateRequest("a", "m", Sampling(), prompt="Q"))]
        assert isinstance(events[0], Accepted)
        assert [e.text for e in events if isinstance(e, TokenEvent)] == ["a", "b"]
        end = events[-1]
        assert isinstance(end, Finished) and end.status is FinishStatus.STOP
        assert (end.prompt_tokens, end.completion_tokens) == (3, 2)
        assert bus.replicas()[0].max_model_len == 128

    with_replica(Scripted(["a", "b"]), body)


def test_a_cancel_closes_the_engines_stream() -> None:
    engine = Scripted(["a", "b", "c"])
    engine.gate.clear()  # the engine holds its second delta: the request stays mid-stream

    async def body(bus: MemoryBus) -> None:
        stream = aiter(await bus.submit(GenerateRequest("a", "m", Sampling(), prompt="Q")))
        assert isinstance(await anext(stream), Accepted)
        assert isinstance(await anext(stream), TokenEvent)
        await bus.cancel("a", "m")
        rest = [e async for e in stream]
        assert isinstance(rest[-1], Finished) and rest[-1].status is FinishStatus.CANCELLED
        assert engine.closed == ["a"]

    with_replica(engine, body)


def test_a_request_past_its_deadline_ends_as_such() -> None:
    engine = Scripted(["a", "b"])
    engine.gate.clear()  # never gets past its first delta: only the deadline ends it

    async def body(bus: MemoryBus) -> None:
        import time

        req = GenerateRequest("a", "m", Sampling(), prompt="Q", deadline=time.time() + 0.2)
        events = [e async for e in await bus.submit(req)]
        assert isinstance(events[-1], Finished) and events[-1].error_code == "deadline_exceeded"
        assert engine.closed == ["a"]

    with_replica(engine, body)


def test_a_pooled_connection_the_upstream_closed_is_retried_once_on_a_new_one() -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, content=STREAM)

    engine = OpenAIUpstream("http://up:8000", "m", transport=httpx.MockTransport(flaky))
    assert run(engine, GenerateRequest("r", "m", Sampling(), prompt="Q"))[-1] == End(FinishStatus.LENGTH, 9, 2, 4)
    assert len(calls) == 2

    def closed(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    engine = OpenAIUpstream("http://up:8000", "m", transport=httpx.MockTransport(closed))
    [end] = run(engine, GenerateRequest("r", "m", Sampling(), prompt="Q"))
    assert isinstance(end, End) and end.error_code == "engine_failure" and len(calls) == 4  # twice, not forever


@pytest.mark.parametrize("line", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b'data: {"choices": [{"text": 3}]}\n\n'])
def test_a_malformed_stream_ends_the_request_instead_of_raising(line: bytes) -> None:
    answer = httpx.Response(200, content=line + b"data: [DONE]\n\n")
    items = run(upstream(answer, []), GenerateRequest("r", "m", Sampling(), prompt="Q"))
    assert isinstance(items[-1], End) and items[-1].error_code == "engine_failure"


class Loaded(Scripted):
    """A Scripted engine with figures of its own, as vLLM's are."""

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=2,
            waiting=1,
            max_model_len=128,
            kv_blocks_in_use=7,
            kv_blocks_total=70,
            speculative="ngram",
            spec_proposed=10,
            spec_accepted=6,
        )


def test_heartbeats_carry_the_engines_figures_the_prefixes_served_and_preloaded_tokens() -> None:
    async def body(bus: MemoryBus) -> None:
        served = [
            GenerateRequest("a", "m", Sampling(), prompt="Q", affinity="session-1"),
            GenerateRequest("b", "m", Sampling(), prompt="Q", affinity="session-2", prefill_only=True, priority=1),
        ]
        for req in served:
            _ = [e async for e in await bus.submit(req)]
        # a heartbeat sent since both ended (an older one may have been sent between them): the prefixes newest
        # first, and the pre-load's prompt (3 tokens, none cached)
        for _ in range(500):
            status = bus.replicas()[0]
            if status.prefixes == ("session-2", "session-1") and status.background_prefill_tokens == 3:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no heartbeat with both requests: {status}")
        assert (status.running, status.waiting, status.kv_blocks_in_use, status.kv_blocks_total) == (2, 1, 7, 70)
        assert (status.speculative, status.spec_proposed, status.spec_accepted) == ("ngram", 10, 6)

    with_replica(Loaded(["a"]), body)
