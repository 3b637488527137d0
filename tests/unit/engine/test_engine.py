"""The engine through its public interface, on the real default model."""

from __future__ import annotations

import pytest

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine, StepOutput
from blink.engine.sequence import FinishReason, SamplingParams
from blink.errors import ContextLengthExceeded, InvalidRequest

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    return LLMEngine(model, tok.stop_token_ids, EngineConfig(max_num_seqs=4, max_model_len=256))


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    texts = ["Name a colour.", "What is the capital of Italy?", "Count to five."]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
    return out


def test_a_request_joining_mid_stream_gets_the_same_tokens(engine: LLMEngine, prompts: list[list[int]]) -> None:
    alone = [engine.generate(p, GREEDY, request_id=f"alone{i}") for i, p in enumerate(prompts)]
    got: dict[str, list[int]] = {}

    def collect(outs: list[StepOutput]) -> None:
        for o in outs:
            got.setdefault(o.request_id, []).append(o.token_id)

    engine.add_request("a0", prompts[0], GREEDY)
    collect(engine.step())
    collect(engine.step())
    engine.add_request("a1", prompts[1], GREEDY)  # joins the running batch at the next step
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a0", "a1"}
    collect(outs)
    engine.add_request("a2", prompts[2], GREEDY)
    while engine.has_work():
        collect(engine.step())
    assert [got[f"a{i}"] for i in range(3)] == alone


def test_abort_frees_the_sequence_at_once(engine: LLMEngine, prompts: list[list[int]]) -> None:
    engine.add_request("x", prompts[0], SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.num_running == 1
    assert engine.abort("x")
    assert engine.num_running == 0 and not engine.has_work()
    assert not engine.abort("x")
    free = engine.scheduler.slots.num_free
    assert free == engine.scheduler.slots.num_slots


def test_more_requests_than_slots_wait_and_all_finish(engine: LLMEngine, prompts: list[list[int]]) -> None:
    for i in range(7):
        engine.add_request(f"w{i}", prompts[i % 3], SamplingParams(max_tokens=5, temperature=0))
    assert len(run_all(engine)) == 7
    assert engine.scheduler.slots.num_free == engine.scheduler.slots.num_slots


def test_max_tokens_and_stop_tokens_end_a_sequence(engine: LLMEngine, prompts: list[list[int]]) -> None:
    engine.add_request("m", prompts[1], SamplingParams(max_tokens=3, temperature=0))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert len(outs) == 3 and outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    engine.add_request("s", prompts[1], SamplingParams(max_tokens=200, temperature=0))
    while engine.has_work():
        outs = engine.step()
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].token_id in engine.stop_token_ids


def test_seeded_sampling_is_reproducible_inside_a_batch(engine: LLMEngine, prompts: list[list[int]]) -> None:
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    alone = engine.generate(prompts[0], p, request_id="seed-alone")
    engine.add_request("seed-batched", prompts[0], p)
    engine.add_request("other", prompts[1], SamplingParams(max_tokens=8, temperature=1.0))
    assert run_all(engine)["seed-batched"] == alone


def test_bad_prompts_are_rejected(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(InvalidRequest):
        engine.add_request("e", [engine.vocab_size], GREEDY)
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("e", [1] * engine.max_model_len, GREEDY)
    assert not engine.has_work()
