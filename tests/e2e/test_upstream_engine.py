"""`blink serve --engine openai --upstream URL`: blink's gateway in front of another OpenAI-compatible server. The
upstream here is a real `blink serve` (the session's server), standing in for llama-server or `vllm serve`; the
client is the `openai` package."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, Server, serving
from tests.redis_server import free_port

pytestmark = pytest.mark.slow

ASK: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Give me two facts about the Moon."}],
    "temperature": 0,
    "max_tokens": 24,
    "extra_body": {"cache": False},
}


@pytest.fixture(scope="module")
def front(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("front") / "front.log"
    flags = ("--engine", "openai", "--upstream", server.base, "--no-semantic-cache", "--resume-window-s", "0")
    with serving(log, *flags) as srv:
        yield srv


@contextlib.contextmanager
def client(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.base}/v1", api_key="test", max_retries=0, timeout=60) as c:
        yield c


def streamed(srv: Server, **ask: Any) -> tuple[str, Any]:
    text, usage = "", None
    with client(srv) as c:
        for chunk in c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
    return text, usage


def test_a_streamed_chat_through_the_front_is_the_upstreams_answer(server: Server, front: Server) -> None:
    direct, direct_usage = streamed(server, **ASK)
    through, usage = streamed(front, **ASK)
    assert through == direct and through  # greedy: token for token
    assert (
        usage.prompt_tokens == direct_usage.prompt_tokens and usage.completion_tokens == direct_usage.completion_tokens
    )
    with client(front) as c:
        assert [m.id for m in c.models.list()] == [MODEL]


def test_a_plain_completion_goes_to_the_upstreams_completions(server: Server, front: Server) -> None:
    ask: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    with client(server) as c:
        direct = c.completions.create(**ask)
    with client(front) as c:
        through = c.completions.create(**ask)
    assert through.choices[0].text == direct.choices[0].text
    assert through.usage is not None and through.usage.prompt_tokens == direct.usage.prompt_tokens  # type: ignore[union-attr]


def test_the_upstreams_refusal_is_the_clients_error(front: Server) -> None:
    long = "word " * 5000  # past the upstream's context: only the upstream can count its tokens
    with client(front) as c, pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    front.wait_idle()


def test_a_client_that_leaves_frees_the_upstreams_request(server: Server, front: Server) -> None:
    ask = {**ASK, "max_tokens": 1000, "extra_body": {"cache": False, "ignore_eos": True}}
    with client(front) as c:
        stream = c.chat.completions.create(**ask, stream=True)
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()
    front.wait_idle()
    server.wait_idle()  # the front closed its stream: the upstream ends it (after its own resume window)


def test_without_its_upstream_the_front_is_not_ready_and_says_so(tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    srv = Server(tmp_path / "front.log", "--engine", "openai", "--upstream", gone, "--no-semantic-cache")
    try:
        deadline = time.monotonic() + 60
        while True:  # the gateway answers at once; its replica waits for the upstream
            assert srv.proc.poll() is None, srv.log()
            try:
                ready = httpx.get(f"{srv.base}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.1)
        assert ready.status_code == 503
        with client(srv) as c, pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(**ASK)
        assert info.value.status_code == 503
    finally:
        srv.stop()
