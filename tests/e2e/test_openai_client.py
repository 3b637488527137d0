"""The official `openai` client against a real server: streaming, non-streaming, errors, disconnects."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, Server

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Give me two facts about the Moon."}]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="test", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_streamed_chat_deltas_concatenate_to_the_non_streamed_answer(client: openai.OpenAI) -> None:
    # the model both times: the first answer, once stored, would answer the second from the semantic cache (a
    # race with the store: flaky), and a hit reports no prompt tokens: no prompt was read
    ask: dict[str, Any] = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    whole = client.chat.completions.create(**ask, extra_body={"cache": False})
    stream = client.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}, extra_body={"cache": False}
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text = whole.choices[0].message.content
    assert text and len([d for d in deltas if d]) > 3  # really streamed, token by token
    assert "".join(deltas) == text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 10  # type: ignore[union-attr]


def test_streamed_completion_matches_non_streamed(client: openai.OpenAI) -> None:
    prompt = "The three primary colours are"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    parts = [
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True)
        if c.choices
    ]
    assert whole.choices[0].text and "".join(parts) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20  # type: ignore[union-attr]


def test_stop_strings_end_the_answer_before_the_stop(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12).choices[0].text
    assert " 6" in free
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=[" 6"])
    assert cut.choices[0].text == free[: free.index(" 6")] and cut.choices[0].finish_reason == "stop"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": "high"}, "top_p"),
    ],
)
def test_out_of_range_or_mistyped_parameters_are_400(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=extra)  # type: ignore[arg-type]
    assert err.value.param == param


def test_prompt_longer_than_the_context_is_400(client: openai.OpenAI, server: Server) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=5)  # type: ignore[arg-type]
    assert err.value.code == "context_length_exceeded"
    server.wait_idle()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"model": "smollm2-135m-instruct"}', "invalid_request"),
        (b'{"model": "smollm2-135m-instruct", "messages": []}', "invalid_request"),
        (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_request"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "invalid_request"),
    ],
)
def test_malformed_bodies_get_openai_style_400(server: Server, body: bytes, code: str) -> None:
    r = httpx.post(f"{server.base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_413(server: Server) -> None:
    big = b"x" * (2 << 20)
    r = httpx.post(f"{server.base}/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_sse_client_that_disconnects_cancels_its_generation(server: Server) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0.7,
        "seed": 1,
    }
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert len(got) >= 2
    # the client is gone: the replica must free the sequence instead of generating 1,500 tokens
    server.wait_idle(timeout=15)


def test_non_streaming_client_that_disconnects_cancels_its_generation(server: Server) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "temperature": 0.7,
        "seed": 1,
        # all 1500 tokens, seconds at any speed: a sampled answer may end early (on an AVX-512 VNNI machine this
        # one did, within the client's 1.5 s, and the test saw no disconnect)
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=1.5)
    server.wait_idle(timeout=15)


def test_a_prefix_cache_hit_answers_exactly_as_the_cold_request_and_reports_cached_tokens(
    client: openai.OpenAI,
) -> None:
    system = "You are the support assistant of a bicycle shop. Answer briefly and politely. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Do you repair tyres?"}]
    answers, cached = [], []
    for _ in range(2):
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)  # type: ignore[arg-type]
        answers.append(reply.choices[0].message.content)
        details = reply.usage.prompt_tokens_details if reply.usage else None
        cached.append(details.cached_tokens if details else None)
    assert cached[0] == 0, "the first request must be cold (a new system prompt)"
    assert cached[1] is not None and cached[1] >= 160  # the long system prompt's blocks were reused
    assert answers[1] == answers[0]


def test_max_tokens_0_prefills_the_prompt_for_the_request_that_follows(client: openai.OpenAI) -> None:
    import uuid

    system = {"role": "system", "content": f"You answer questions about ships. Session {uuid.uuid4().hex}. " * 6}
    messages: Any = [system, {"role": "user", "content": "What is a keel?"}]
    warm = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=0, extra_body={"cache": False})
    assert warm.choices[0].message.content == "" and warm.choices[0].finish_reason == "length"
    usage = warm.usage
    assert usage is not None and usage.completion_tokens == 0 and usage.prompt_tokens > 60
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    # the same prompt next: all its whole blocks are cached (the last partial block is computed again)
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"cache": False}
    )
    assert answer.choices[0].message.content
    cached = answer.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached == (answer.usage.prompt_tokens - 1) // 16 * 16 > 0  # type: ignore[union-attr]
    # streamed, and a prompt already cached: still an empty answer with its usage
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == usage.prompt_tokens
