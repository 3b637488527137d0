"""`blink edge --core URL`: a real core (`blink serve`, its model served as `core-model`), a real edge in front of
it, and between them the latency-injecting proxy (blink.bench.netem), through which the tests cut the link. Clients
are the `openai` package, httpx and `websockets`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from blink.edge.policy import DEFAULT_RULES
from tests.e2e.conftest import MODEL, ProxyThread, Server, serving
from tests.e2e.test_preload import background_tokens, type_out
from tests.e2e.test_realtime import ask, session, until

pytestmark = pytest.mark.slow

CORE_MODEL = "core-model"
CODE = "Write a Python function that returns the squares of a list of numbers."
SHORT = "What is the capital of France?"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("core") / "core.log"
    with serving(log, "--served-model-name", CORE_MODEL, "--max-num-seqs", "16", "--resume-window-s", "20") as srv:
        yield srv


@pytest.fixture(scope="module")
def link(core: Server) -> Iterator[ProxyThread]:
    proxy = ProxyThread(core.port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, link: ProxyThread) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("edge")
    routing = folder / "routing.json"  # an operator's table: the default, with its edge model qualified for short chat
    table = [{**r, "when": {"edge_model": [MODEL]}} if r["name"] == "short-chat" else r for r in DEFAULT_RULES]
    routing.write_text(json.dumps(table))
    core_url = f"http://127.0.0.1:{link.proxy.port}"
    flags = ("--core", core_url, "--routing", str(routing), "--max-num-seqs", "16", "--link-timeout-s", "2")
    srv = Server(folder / "edge.log", *flags, command="edge")
    try:
        srv.wait_ready()
        wait_for(lambda: CORE_MODEL in models(srv), "the edge learns the core's models")
        yield srv
    finally:
        srv.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def models(srv: Server) -> list[str]:
    return [m["id"] for m in httpx.get(f"{srv.base}/v1/models", timeout=5).json()["data"]]


def metric(srv: Server, name: str) -> float:
    text = httpx.get(f"{srv.base}/metrics", timeout=5).text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)]
    assert values, f"no {name} in /metrics"
    return values[0]


def link_up(srv: Server) -> bool:
    return metric(srv, "blink_edge_link_up") == 1.0


def core_responses(core: Server) -> float:
    text = httpx.get(f"{core.base}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r'^blink_responses_total\{model="core-model"[^}]*\} (\S+)$', text, re.M))


def chat(srv: Server, question: str, model: str = "auto", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{srv.base}/v1/chat/completions", json={**body, **extra}, timeout=120)


def test_auto_keeps_short_chat_at_the_edge_and_sends_code_to_the_core(core: Server, edge: Server) -> None:
    served = core_responses(core)
    short = chat(edge, SHORT, cache=False)
    assert short.status_code == 200, short.text
    assert short.headers["x-blink-route"] == "edge"
    assert short.json()["model"] == MODEL and short.json()["timings"]["route_rule"] == "short-chat"
    assert core_responses(core) == served  # the core never saw it

    code = chat(edge, CODE, cache=False)
    assert code.status_code == 200, code.text
    assert code.headers["x-blink-route"] == "core"
    body = code.json()
    assert (
        body["model"] == CORE_MODEL and body["timings"]["route"] == "core" and body["timings"]["route_rule"] == "code"
    )
    assert body["choices"][0]["message"]["content"]
    assert core_responses(core) == served + 1

    stop = [".", ",", "\n"]  # the answer completes (only a completed answer is cached)
    assert chat(edge, SHORT, stop=stop).headers["x-blink-route"] == "edge"
    assert chat(edge, SHORT, stop=stop).headers["x-blink-route"] == "cache"  # the edge's semantic cache first
    metrics = httpx.get(f"{edge.base}/metrics", timeout=5).text
    assert 'blink_routes_total{route="core",rule="code"}' in metrics
    assert re.search(r'blink_time_to_first_token_seconds_count\{[^}]*route="core"', metrics)


def test_a_core_model_streams_through_the_edge_token_for_token(core: Server, edge: Server) -> None:
    ask_: dict[str, Any] = {
        "model": CORE_MODEL,
        "messages": [{"role": "user", "content": "Name three rivers of Europe."}],
        "max_tokens": 32,
        "temperature": 0,
        "extra_body": {"cache": False},
    }

    def streamed(srv: Server) -> tuple[list[str], Any]:
        with openai.OpenAI(base_url=f"{srv.base}/v1", api_key="k", max_retries=0, timeout=60) as client:
            parts, usage = [], None
            for chunk in client.chat.completions.create(**ask_, stream=True, stream_options={"include_usage": True}):
                usage = chunk.usage or usage
                parts += [c.delta.content for c in chunk.choices if c.delta.content]
            return parts, usage

    direct, direct_usage = streamed(core)
    through, usage = streamed(edge)
    assert "".join(through) == "".join(direct) and len(through) > 3  # streamed, not buffered into one chunk
    assert usage.completion_tokens == direct_usage.completion_tokens
    assert usage.prompt_tokens == direct_usage.prompt_tokens


def test_drafts_of_a_core_bound_session_preload_the_core(core: Server, edge: Server) -> None:
    question = CODE + " Use a comprehension."

    async def main() -> dict[str, Any]:
        ws = await session(edge, model="auto", instructions="You write short, correct Python.")
        try:
            before = await asyncio.to_thread(background_tokens, core)
            await type_out(ws, question[:-6], pause=0.005)
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(background_tokens, core) <= before:  # the core computed the drafts
                assert time.monotonic() < deadline, "no pre-load reached the core"
                await asyncio.sleep(0.05)
            await type_out(ws, question, start=len(question) - 6)
            await ask(ws, question, temperature=0, max_output_tokens=8)
            done, _ = await until(ws, "response.done")
            return done["response"]  # type: ignore[no-any-return]
        finally:
            await ws.close()

    response = asyncio.run(main())
    assert response["status"] in ("completed", "incomplete") and response["route"] == "core"
    assert response["timings"]["cached_tokens"] > 0  # the core's prefix cache held the drafts' prompt


def test_a_cancel_reaches_the_core_and_frees_its_sequence(core: Server, edge: Server) -> None:
    async def main() -> dict[str, Any]:
        ws = await session(edge, model=CORE_MODEL)
        try:
            await ask(ws, "Tell me a very long story about a lighthouse.", temperature=0, max_output_tokens=2000)
            await until(ws, "response.output_text.delta")
            await ws.send(json.dumps({"type": "response.cancel"}))
            done, _ = await until(ws, "response.done")
            return done["response"]  # type: ignore[no-any-return]
        finally:
            await ws.close()

    response = asyncio.run(main())
    assert response["status"] == "cancelled" and response["route"] == "core"
    core.wait_idle()  # the core's replica holds no sequence of it


def test_streams_survive_a_five_second_link_cut(core: Server, edge: Server, link: ProxyThread) -> None:
    connects = metric(edge, "blink_edge_link_connects_total")
    first = [threading.Event() for _ in range(8)]

    def stream(i: int) -> tuple[str, str | None, int]:
        with openai.OpenAI(base_url=f"{edge.base}/v1", api_key="k", max_retries=0, timeout=120) as client:
            text, reason, usage = "", None, 0
            chunks = client.chat.completions.create(
                model=CORE_MODEL,
                messages=[{"role": "user", "content": f"Count slowly from {i} to a thousand."}],
                max_tokens=160,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"cache": False, "ignore_eos": True},
            )
            for chunk in chunks:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    reason = choice.finish_reason or reason
                    first[i].set()
                usage = chunk.usage.completion_tokens if chunk.usage else usage
            return text, reason, usage

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        for started in first:
            assert started.wait(120), "a stream never started"
        link.cut("blackhole")
        time.sleep(5)  # the outage being tested lasts this long
        link.restore()
        results = [f.result(timeout=180) for f in futures]
    for text, reason, tokens in results:
        assert reason == "length" and tokens == 160 and text  # each completed, none lost or cut short
    wait_for(lambda: link_up(edge), "the link is up again")
    assert metric(edge, "blink_edge_link_connects_total") > connects  # it reconnected on its own


def test_an_unreachable_core_degrades_auto_and_refuses_its_models(
    core: Server, edge: Server, link: ProxyThread
) -> None:
    link.cut("reset")
    try:
        wait_for(lambda: not link_up(edge), "the edge sees the link down")
        degraded = chat(edge, CODE, cache=False)
        assert degraded.status_code == 200, degraded.text
        assert degraded.headers["x-blink-route"] == "edge; degraded" and degraded.json()["timings"]["degraded"] is True
        refused = chat(edge, SHORT, model=CORE_MODEL, cache=False)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "core_unreachable"
    finally:
        link.restore()
    wait_for(lambda: link_up(edge), "the link is up again")
    back = chat(edge, SHORT, model=CORE_MODEL, cache=False)
    assert back.status_code == 200 and back.headers["x-blink-route"] == "core"


def test_the_web_client_on_the_edge_says_where_each_answer_came_from(core: Server, edge: Server) -> None:
    from tests.e2e.browser import chromium
    from tests.e2e.test_web_client import ask, last_answer, open_page

    with chromium() as (_, browser):
        page = browser.new_page()
        open_page(page, edge.base, max_tokens="12")
        assert page.input_value("#model") == "auto"  # the edge session's own model, until the user picks one
        ask(page, CODE)
        assert "route core" in last_answer(page, 1)["timings"]
        ask(page, SHORT)
        assert "route edge" in last_answer(page, 2)["timings"]
