"""The engine through its public interface, on the real default model."""

from __future__ import annotations

import time

import pytest

from blink.config import EngineConfig
from blink.engine.errors import ContextTooLong, RequestRejected
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import FinishReason, SamplingParams, StepOutput

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    return LLMEngine(model, tok.stop_token_ids, EngineConfig(max_num_seqs=4, max_model_len=256))


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    texts = ["Name a colour.", "What is the capital of Italy?", "Count to five."]
    return [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            assert o.token_id is not None
            out.setdefault(o.request_id, []).append(o.token_id)
    return out


def no_blocks_held(engine: LLMEngine) -> bool:
    return engine.blocks.num_free_blocks == engine.blocks.num_blocks and all(
        b.ref_count == 0 for b in engine.blocks.blocks
    )


def small_engine(model_and_tokenizer, **kwargs) -> LLMEngine:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    return LLMEngine(model, tok.stop_token_ids, EngineConfig(**{"max_num_seqs": 4, "max_model_len": 256, **kwargs}))


def test_a_prefix_hit_gives_the_same_greedy_tokens_as_a_cold_start(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    system = {"role": "system", "content": "You are a terse assistant who answers geography questions. " * 4}
    first = tok.encode_chat([system, {"role": "user", "content": "Capital of Spain?"}])
    second = tok.encode_chat([system, {"role": "user", "content": "Capital of Peru?"}])
    cold = small_engine(model_and_tokenizer, prefix_caching=False)
    cold_tokens = cold.generate(second, GREEDY)
    warm = small_engine(model_and_tokenizer)
    warm.generate(first, GREEDY, request_id="first")
    warm.add_request("second", second, GREEDY)
    outs = []
    while warm.has_work():
        outs += warm.step()
    assert [o.token_id for o in outs] == cold_tokens
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert outs[-1].cached_tokens == shared // 16 * 16 > 0  # every full block of the shared prefix was reused


def test_a_request_that_ends_with_its_first_token_leaves_its_prompt_for_reuse(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    doc = "The museum opens at nine and closes at five, except on Mondays. " * 6
    first = tok.encode_chat([{"role": "user", "content": doc + "When does it open?"}])
    second = tok.encode_chat([{"role": "user", "content": doc + "When does it close?"}])
    engine = small_engine(model_and_tokenizer)
    engine.generate(first, SamplingParams(max_tokens=1, temperature=0), request_id="first")  # done in one step
    engine.add_request("second", second, GREEDY)
    outs = []
    while engine.has_work():
        outs += engine.step()
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert outs[-1].cached_tokens == shared // 16 * 16 > 0


@pytest.mark.slow  # ~7 s of real-model steps
def test_chunked_prefill_and_preemption_change_no_greedy_token(
    model_and_tokenizer,  # type: ignore[no-untyped-def]
    prompts: list[list[int]],
) -> None:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = small_engine(model_and_tokenizer)
    expected = {f"r{i}": roomy.generate(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)}
    # 8 blocks of 16 tokens for three sequences of ~60 tokens (4 blocks each, one shared); prompts in chunks of 16
    tight = small_engine(
        model_and_tokenizer, kv_cache_mb=6, max_model_len=64, max_num_batched_tokens=64, prefill_chunk_tokens=16
    )
    assert tight.blocks.num_blocks == 8
    preempted = []
    for i, p in enumerate(prompts):
        tight.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {}
    while tight.has_work():
        for o in tight.step():
            assert o.token_id is not None
            got.setdefault(o.request_id, []).append(o.token_id)
        preempted += [s.request_id for s in tight.scheduler.running + tight.scheduler.waiting if s.num_preemptions]
    assert got == expected
    assert preempted, "the pool was meant to be too small for all three"
    assert no_blocks_held(tight)


def test_aborting_mid_prefill_frees_every_block(model_and_tokenizer, prompts: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    engine = small_engine(model_and_tokenizer, max_num_batched_tokens=4)
    engine.add_request("long", prompts[1] * 3, GREEDY)
    assert engine.step() == []  # a first chunk only: no token yet
    seq = engine.scheduler.running[0]
    assert 0 < seq.num_computed < seq.num_tokens and engine.blocks.table("long")
    assert engine.abort("long")
    assert no_blocks_held(engine) and not engine.has_work()


def test_an_expired_request_ends_without_a_token_and_frees_its_blocks(
    model_and_tokenizer,  # type: ignore[no-untyped-def]
    prompts: list[list[int]],
) -> None:
    engine = small_engine(model_and_tokenizer)
    engine.add_request("late", prompts[0], GREEDY, deadline=time.monotonic() + 3600)
    engine.step()
    engine.scheduler.running[0].deadline = time.monotonic() - 1
    (out,) = engine.step()
    assert out.token_id is None and out.finish_reason is FinishReason.EXPIRED and out.finished
    assert no_blocks_held(engine) and not engine.has_work()


def test_a_request_joining_mid_stream_gets_the_same_tokens(engine: LLMEngine, prompts: list[list[int]]) -> None:
    alone = [engine.generate(p, GREEDY, request_id=f"alone{i}") for i, p in enumerate(prompts)]
    got: dict[str, list[int]] = {}

    def collect(outs: list[StepOutput]) -> None:
        for o in outs:
            assert o.token_id is not None
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
    assert no_blocks_held(engine)


def test_more_requests_than_slots_wait_and_all_finish(engine: LLMEngine, prompts: list[list[int]]) -> None:
    for i in range(7):
        engine.add_request(f"w{i}", prompts[i % 3], SamplingParams(max_tokens=5, temperature=0))
    assert len(run_all(engine)) == 7
    assert no_blocks_held(engine)


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
    with pytest.raises(RequestRejected):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(RequestRejected):
        engine.add_request("e", [engine.vocab_size], GREEDY)
    with pytest.raises(ContextTooLong) as too_long:
        engine.add_request("e", [1] * engine.max_model_len, GREEDY)
    assert too_long.value.param == "messages"
    with pytest.raises(ContextTooLong) as too_long:  # the prompt fits, the answer it asks for does not
        engine.add_request("e", [1] * (engine.max_model_len - 4), SamplingParams(max_tokens=5, temperature=0))
    assert too_long.value.param == "max_tokens"
    assert not engine.has_work()
    # max_tokens None: up to the end of the context
    engine.add_request("rest", [1] * (engine.max_model_len - 3), SamplingParams(max_tokens=None, temperature=0))
    assert 1 <= len(run_all(engine)["rest"]) <= 3


def test_a_prefill_only_request_fills_the_cache_for_the_prompt_that_follows(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    system = {"role": "system", "content": "You answer questions about the solar system in one sentence. " * 3}
    prompt = tok.encode_chat([system, {"role": "user", "content": "How hot is Venus?"}])
    cold = small_engine(model_and_tokenizer, prefix_caching=False).generate(prompt, GREEDY)
    engine = small_engine(model_and_tokenizer)
    draft = prompt[: len(prompt) - 9]  # what the user had typed: most of the prompt
    engine.add_request("pre", draft, GREEDY, priority=1, prefill_only=True)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [(o.request_id, o.token_id, o.finish_reason) for o in outs] == [("pre", None, FinishReason.PREFILLED)]
    assert no_blocks_held(engine)  # nothing held: the blocks are only cached
    engine.add_request("live", prompt, GREEDY)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [o.token_id for o in outs] == cold  # the same answer as without pre-loading
    assert outs[-1].cached_tokens == len(draft) // 16 * 16 > 0
