"""The drivers against scripted servers: SSE through httpx's mock transport, WebSocket on a real local socket."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from blink.bench.clients import Outcome, SseDriver, Target, WsDriver, _finish_ws
from blink.bench.workload import Job
from blink.config import BenchConfig
from tests.unit.bench.fakes import realtime

CFG = BenchConfig(typing_ms=0.0, request_timeout_s=5.0)
JOB = Job(0, 0.0, "some pasted text", ("what", "is", "it?"), 8, None, None)


def sse_body(pieces: list[str], *, usage: bool = True, done: bool = True, error: bool = False) -> bytes:
    chunks = [{"choices": [{"delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"delta": {"content": p}}]} for p in pieces]
    if error:
        chunks.append({"error": {"code": "engine_failure", "message": "boom"}})
    if usage:
        chunks.append({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": len(pieces) + 1}})
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def run_sse(job: Job, response: httpx.Response, cfg: BenchConfig = CFG) -> tuple[Any, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return response

    async def go() -> Any:
        driver = SseDriver(Target("http://bench.test/v1", "sse", "x"), cfg)
        await driver.http.aclose()
        driver.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        try:
            return await driver.run(job, time.perf_counter())
        finally:
            await driver.close()

    return asyncio.run(go()), sent


def test_sse_completed_stream() -> None:
    result, sent = run_sse(JOB, httpx.Response(200, content=sse_body(["a", "b", "c"])))
    assert result.outcome is Outcome.COMPLETED and result.error is None
    assert len(result.stamps) == 3 and result.ttft_s is not None and result.ttft_s >= 0
    assert (result.output_tokens, result.prompt_tokens) == (4, 40)  # the server's count, not the deltas
    body = sent[0]
    assert body["stream"] is True and body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert body["cache"] is False and body["messages"][0]["content"] == JOB.prompt


def test_sse_interrupt_closes_the_stream_after_n_deltas() -> None:
    job = Job(1, 0.0, "ctx", ("q",), 8, 2, None)
    result, _ = run_sse(job, httpx.Response(200, content=sse_body(["a", "b", "c", "d"])))
    assert result.outcome is Outcome.INTERRUPTED and len(result.stamps) == 2 and result.output_tokens == 2


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(429, json={"error": {"code": "overloaded"}}), "http: 429 overloaded"),
        (httpx.Response(200, content=sse_body(["a"], error=True)), "stream error: engine_failure"),
        (httpx.Response(200, content=sse_body(["a"], done=False)), "disconnected"),
    ],
)
def test_sse_failures_are_errors(response: httpx.Response, error: str) -> None:
    result, _ = run_sse(JOB, response)
    assert result.outcome is Outcome.ERROR and result.error is not None and result.error.startswith(error)


def test_sse_unreachable_server_is_an_error() -> None:
    async def go() -> Any:
        driver = SseDriver(Target("http://127.0.0.1:9", "sse", "x"), CFG)
        try:
            return await driver.run(JOB, time.perf_counter())
        finally:
            await driver.close()

    result = asyncio.run(go())
    assert result.outcome is Outcome.ERROR and result.error.startswith("connect")


def run_ws(job: Job, mode: str = "ok") -> tuple[Any, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    async def go() -> Any:
        async with realtime(mode, received) as url:
            driver = WsDriver(Target(url, "ws", "x"), CFG)
            try:
                return await driver.run(job, time.perf_counter())
            finally:
                await driver.close()

    return asyncio.run(go()), received


def test_ws_session_types_drafts_then_submits() -> None:
    job = Job(0, 0.0, "ctx", ("what", "is", "it?"), 8, None, 1)
    result, received = run_ws(job)
    assert result.outcome is Outcome.COMPLETED, result.error
    assert len(result.stamps) == 6 and (result.output_tokens, result.prompt_tokens, result.cached_tokens) == (6, 30, 16)
    kinds = [e["type"] for e in received]
    assert kinds == [
        "session.update",
        "context.open",
        *["input_text.draft"] * 3,
        "conversation.item.create",
        "response.create",
    ]
    assert [e["text"] for e in received if e["type"] == "input_text.draft"] == [job.draft(n) for n in (1, 2, 3)]
    assert received[0]["session"]["retrieval"] == {"top_k": 2} and received[0]["session"]["max_output_tokens"] == 8
    assert received[1]["document_ids"] == ["bench-0-1"]


def test_ws_interrupt_sends_a_cancel() -> None:
    result, received = run_ws(Job(0, 0.0, "ctx", ("q",), 8, 2, None))
    assert result.outcome is Outcome.INTERRUPTED and 2 <= len(result.stamps) < 6
    assert received[-1]["type"] == "response.cancel"


@pytest.mark.parametrize(("mode", "error"), [("refuse", "refused: overloaded"), ("fail", "response failed")])
def test_ws_refused_or_failed_is_an_error(mode: str, error: str) -> None:
    result, _ = run_ws(JOB, mode)
    assert result.outcome is Outcome.ERROR and result.error is not None and result.error.startswith(error)


@pytest.mark.parametrize(
    ("status", "details", "cancelled", "outcome"),
    [
        ("completed", {}, False, Outcome.COMPLETED),
        ("incomplete", {"reason": "max_output_tokens"}, False, Outcome.COMPLETED),
        ("completed", {}, True, Outcome.COMPLETED),  # the cancel came too late: the answer was whole
        ("cancelled", {}, True, Outcome.INTERRUPTED),
        ("cancelled", {}, False, Outcome.ERROR),
        ("incomplete", {"reason": "server_shutdown"}, False, Outcome.ERROR),
    ],
)
def test_ws_statuses(status: str, details: dict[str, Any], cancelled: bool, outcome: Outcome) -> None:
    from blink.bench.clients import Result

    result = Result(0, 0.0)
    _finish_ws({"status": status, "status_details": details, "usage": {"output_tokens": 3}}, result, cancelled)
    assert result.outcome is outcome
