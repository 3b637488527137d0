"""Which request may adopt a held pre-decode (worker/predecode.py): only its own question, tenant and session."""

from __future__ import annotations

import dataclasses

import pytest

from blink.bus.messages import GenerateRequest, Sampling
from blink.worker.predecode import Held, Predecodes, adoptable

SAMPLING = Sampling(max_tokens=32, temperature=0.7, seed=3)
MESSAGES = ({"role": "user", "content": "Hi"},)


def pre(**kw) -> GenerateRequest:  # type: ignore[no-untyped-def]
    return GenerateRequest(
        "pre-1", "m", SAMPLING, messages=MESSAGES, session_id="s1", tenant="acme", priority=2, predecode=4, **kw
    )


def live(**kw) -> GenerateRequest:  # type: ignore[no-untyped-def]
    base = GenerateRequest("resp-1", "m", SAMPLING, messages=MESSAGES, session_id="s1", tenant="acme", adopt="pre-1")
    return dataclasses.replace(base, **kw)


class _Out:
    token_id = 5


def test_the_same_question_is_adoptable_whatever_its_max_tokens_and_stop() -> None:
    h = Held(pre(), [1, 2, 3], outputs=[_Out()] * 4)  # type: ignore[list-item]
    assert adoptable(h, live(), [1, 2, 3])
    assert adoptable(h, live(sampling=dataclasses.replace(SAMPLING, max_tokens=None, stop=("\n",))), [1, 2, 3])


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "globex"},  # another tenant's pre-decode, even with the same prompt
        {"session_id": "s2"},
        {"model": "other"},
        {"prediction": "Hello"},
        {"sampling": dataclasses.replace(SAMPLING, seed=4)},
        {"sampling": dataclasses.replace(SAMPLING, temperature=0.0)},
        {"sampling": dataclasses.replace(SAMPLING, max_tokens=4)},  # no room past the held tokens
    ],
)
def test_anything_else_runs_as_its_own_request(change: dict) -> None:  # type: ignore[type-arg]
    h = Held(pre(), [1, 2, 3], outputs=[_Out()] * 4)  # type: ignore[list-item]
    assert not adoptable(h, live(**change), [1, 2, 3])


def test_another_prompt_is_not_adoptable() -> None:
    h = Held(pre(), [1, 2, 3], outputs=[_Out()] * 4)  # type: ignore[list-item]
    assert not adoptable(h, live(), [1, 2, 4])


def test_one_pre_decode_per_session() -> None:
    p = Predecodes()
    assert p.add(pre(), [1]) is None
    assert p.add(dataclasses.replace(pre(), request_id="pre-2"), [1]) == "pre-1"
    assert p.forget("pre-1") is not None and p.forget("pre-2") is not None
    assert p.add(dataclasses.replace(pre(), request_id="pre-3"), [1]) is None
