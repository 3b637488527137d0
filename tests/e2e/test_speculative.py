"""Speculative decoding through the real server (its default: --speculative ngram) and the `openai` client: the
greedy text equals plain decoding's, stop strings inside kept guesses cut the answer where they should, and the
response reports what was guessed. The server here runs --speculative-policy always, so that every step guesses
(the default adaptive policy may rightly guess nothing on a short answer, which would prove nothing)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from blink.config import EngineConfig, default_cache_dir
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import loader, quant
from blink.worker import loading
from tests.e2e.conftest import MODEL, Server, serving

pytestmark = pytest.mark.slow

CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""
MESSAGES = [{"role": "user", "content": "Add a docstring to this function:\n\n" + CODE}]


@pytest.fixture(scope="module")
def plain_answer(model_dir) -> str:  # type: ignore[no-untyped-def]
    """The same request decoded in-process without speculation (same weights format as the server's default)."""
    model, tok = loader.load(model_dir)
    weights = loading.weights_for(MODEL, EngineConfig(), default_cache_dir())
    quant.convert(model, weights, tok.encode(quant.CALIBRATION_TEXT))
    engine = LLMEngine(model, tok.stop_token_ids, EngineConfig(max_model_len=512))
    ids = engine.generate(tok.encode_chat(MESSAGES), SamplingParams(max_tokens=80, temperature=0))
    return tok.decode([t for t in ids if t not in tok.stop_token_ids])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("speculative") / "serve.log", "--speculative-policy", "always") as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="test", max_retries=0, timeout=120)


def test_greedy_text_equals_plain_decoding_and_reports_its_guesses(
    client: openai.OpenAI, server: Server, plain_answer: str
) -> None:
    before = server.readyz()["replicas"][0]["speculative"]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,
        extra_body={"cache": False},  # the model must answer, not the semantic cache
    )
    assert answer.choices[0].message.content == plain_answer
    timings: dict[str, Any] = (answer.model_extra or {})["timings"]  # blink's extra field, kept by the client
    guessed = timings["speculative"]
    assert 0 <= guessed["accepted"] <= guessed["proposed"]
    proposed, accepted = guessed["proposed"], guessed["accepted"]
    assert proposed > 0 and accepted > 0
    after = server.wait_idle()["replicas"][0]["speculative"]  # a heartbeat sent after the answer
    assert after["mode"] == "ngram"
    assert after["accepted"] - before["accepted"] >= accepted


def test_a_stop_string_inside_kept_guesses_cuts_the_answer_there(
    client: openai.OpenAI, server: Server, plain_answer: str
) -> None:
    stop = "/ len"  # inside the rewritten code, which copies the input: reached in a run of kept guesses
    assert stop in plain_answer
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,
        stop=[stop],
        stream=True,
    )
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == plain_answer[: plain_answer.index(stop)]
    assert finish == "stop"
    server.wait_idle()


def test_a_prediction_gives_the_same_answer_and_usage_reports_what_was_kept(
    client: openai.OpenAI, plain_answer: str
) -> None:
    """OpenAI's Predicted Outputs: the answer itself, the file being edited, or something unrelated."""
    kept = {}
    for name, prediction in (("exact", plain_answer), ("file", CODE), ("unrelated", "Paris is in France. " * 8)):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=80,
            prediction={"type": "content", "content": prediction},
            extra_body={"cache": False},
        )
        assert answer.choices[0].message.content == plain_answer, name
        assert answer.usage is not None and answer.usage.completion_tokens_details is not None
        details = answer.usage.completion_tokens_details
        assert details.accepted_prediction_tokens is not None and details.rejected_prediction_tokens is not None
        kept[name] = (details.accepted_prediction_tokens, details.rejected_prediction_tokens)
        total = answer.usage.completion_tokens
    # all but the first token (the prefill's) can come from the answer itself; of the file, what prompt lookup
    # (which finds it in the prompt) did not guess first
    assert kept["exact"][0] >= 0.8 * total and kept["exact"][1] <= 4
    assert kept["unrelated"][0] <= 2


def test_a_malformed_prediction_is_a_400_naming_it(client: openai.OpenAI) -> None:
    for bad in ({"type": "text", "content": "x"}, {"type": "content", "content": 3}, "x"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=4,
                prediction=bad,  # type: ignore[arg-type]
            )
        assert (info.value.body or {}).get("param", "").startswith("prediction")  # type: ignore[union-attr]


def test_a_realtime_response_takes_a_prediction(server: Server) -> None:
    async def respond(ws: ClientConnection, prediction: str | None) -> tuple[str, dict[str, Any]]:
        response: dict[str, Any] = {"conversation": "none", "temperature": 0, "max_output_tokens": 60, "cache": False}
        if prediction is not None:
            response["prediction"] = {"type": "content", "content": [{"type": "text", "text": prediction}]}
        await ws.send(json.dumps({"type": "response.create", "response": response}))
        text = ""
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            assert event["type"] != "error", event
            if event["type"] == "response.output_text.delta":
                text += event["delta"]
            if event["type"] == "response.done":
                return text, event["response"]

    async def main() -> list[tuple[str, dict[str, Any]]]:
        async with connect(server.ws_url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            content = [{"type": "input_text", "text": MESSAGES[0]["content"]}]
            item = {"type": "message", "role": "user", "content": content}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            plain = await respond(ws, None)
            return [plain, await respond(ws, plain[0])]

    (plain, _), (predicted, done) = asyncio.run(main())
    assert predicted == plain and done["status"] in ("completed", "incomplete")
    details = done["usage"]["output_token_details"]
    assert details["accepted_prediction_tokens"] >= 0.8 * done["usage"]["output_tokens"]
