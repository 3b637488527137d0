"""`blink serve --engine vllm`: vLLM's AsyncLLM as the engine of blink's replica (opt-in: make install-vllm, then
pytest -m vllm), on the default model exported as a Hugging Face folder. The clients are the `openai` package and
a WebSocket; vLLM's own figures (its Prometheus metrics on blink's /metrics, its `cached_tokens`) show what it did."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, VLLM_FLAGS, Server, serving
from tests.e2e.test_preload import QUESTION, answer, preloads_settled, type_out
from tests.e2e.test_realtime import ask, session, until
from tests.e2e.test_tracing import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def vserver(hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    flags = ("--model", str(hf_model_dir), *VLLM_FLAGS, "--no-semantic-cache", "--resume-window-s", "0")
    with serving(log, *flags) as srv:
        yield srv


def vllm_gauge(server: Server, name: str) -> float:
    """One of vLLM's own gauges (its Prometheus stat logger's) as blink's /metrics shows it."""
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    match = re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"no vllm:{name} in /metrics"
    return float(match.group(1))


def test_the_openai_client_streams_an_answer_from_vllm(vserver: Server) -> None:
    ask_: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give me two facts about the Moon."}],
        "temperature": 0,
        "max_tokens": 16,
        "extra_body": {"ignore_eos": True},
    }
    with openai.OpenAI(base_url=f"{vserver.base}/v1", api_key="k", max_retries=0, timeout=60) as client:
        chunks = list(client.chat.completions.create(**ask_, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert text.strip() and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
        assert usage is not None and usage.completion_tokens == 16 and usage.prompt_tokens > 10
        again = client.chat.completions.create(**ask_)
        assert again.choices[0].message.content == text  # greedy: the same answer streamed or not
    replica = vserver.readyz()["replicas"][0]
    assert replica["kv_blocks_total"] > 0  # vLLM's own KV cache, in the heartbeat


def test_a_cancel_over_the_websocket_frees_the_vllm_request(vserver: Server) -> None:
    async def main() -> dict[str, Any]:
        async with await session(vserver, temperature=0.7, seed=3) as ws:
            await ask(ws, "Write a very long story about a dragon.", max_output_tokens=900)
            for _ in range(3):
                await until(ws, "response.output_text.delta")
            running = await asyncio.to_thread(vllm_gauge, vserver, "num_requests_running")
            assert running == 1  # vLLM itself runs it
            await ws.send(json.dumps({"type": "response.cancel"}))
            done, _ = await until(ws, "response.done")
            return done["response"]  # type: ignore[no-any-return]

    response = asyncio.run(main())
    assert response["status"] == "cancelled" and response["usage"]["output_tokens"] < 900
    deadline = time.monotonic() + 15
    while vllm_gauge(vserver, "num_requests_running") or vllm_gauge(vserver, "num_requests_waiting"):
        assert time.monotonic() < deadline, "vLLM still holds the cancelled request"
        time.sleep(0.1)


def test_drafts_preload_vllms_prefix_cache(vserver: Server) -> None:
    instructions = f"You are a museum guide; answer in one sentence. (visit {uuid.uuid4().hex[:8]}) " * 4

    async def main() -> dict[str, Any]:
        ws = await session(vserver, instructions=instructions)
        try:
            before = sum(r["background_prefill_tokens"] for r in vserver.readyz()["replicas"])
            await type_out(ws, QUESTION[:-12], pause=0.01)  # all but the last words, then a pause
            await preloads_settled(vserver, before)
            await type_out(ws, QUESTION, start=len(QUESTION) - 12)
            return await answer(ws, QUESTION)
        finally:
            await ws.close()

    timings = asyncio.run(main())["timings"]
    assert timings["preloaded"] is True
    # vLLM's cached_tokens: the pre-load's full blocks (32 tokens) held the prompt up to the last words
    assert timings["cached_tokens"] > 0
    assert timings["prompt_tokens"] - timings["cached_tokens"] < 32 + 16


def test_vllms_spans_join_the_requests_trace(hf_model_dir: Path, tmp_path: Path) -> None:
    """With OTEL_TRACES_EXPORTER=otlp, vLLM exports its own span of the request to blink's collector, in the trace
    blink's gateway started (the request's traceparent, handed to vLLM)."""
    receiver = Receiver()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    flags = ("--model", str(hf_model_dir), *VLLM_FLAGS, "--no-semantic-cache")
    server = Server(tmp_path / "serve.log", *flags, env=env)
    try:
        server.wait_ready()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        assert httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60).status_code == 200
        deadline = time.monotonic() + 30
        while not any(s.name == "llm_request" for _, s in receiver.spans):  # vLLM's span of a request
            assert time.monotonic() < deadline, [(svc, s.name) for svc, s in receiver.spans]
            time.sleep(0.2)
    finally:
        server.stop()
        receiver.server.shutdown()
        receiver.server.server_close()
    (root,) = [s for _, s in receiver.spans if s.name == "blink.response"]
    (theirs,) = [s for _, s in receiver.spans if s.name == "llm_request"]
    ours = {s.span_id for _, s in receiver.spans if s.name != "llm_request" and s.trace_id == root.trace_id}
    assert theirs.trace_id == root.trace_id and theirs.parent_span_id in ours  # a child of one of blink's spans
