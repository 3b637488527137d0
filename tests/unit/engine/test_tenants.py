"""Tenants in the engine, on the real default model: the prefix cache partitioned per tenant (with declared shared
prefixes), fair preemption that changes no greedy token, and steps called off for another tenant's newcomer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams, StepOutput
from blink.engine.speculative import NgramProposer
from tests.unit.engine.test_engine import no_blocks_held, run_all, small_engine

GREEDY = SamplingParams(max_tokens=4, temperature=0)
SYSTEM = "You are a terse assistant who answers questions about European geography in a single sentence. " * 2


def chat(tok, system: str, user: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": user}]))


def finish(engine: LLMEngine, request_id: str, prompt: list[int], tenant: str | None) -> StepOutput:
    engine.add_request(request_id, prompt, GREEDY, tenant=tenant)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].request_id == request_id
    return outs[-1]


def test_a_tenant_never_finds_another_tenants_prefix_blocks(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    prompt = chat(tok, SYSTEM, "Capital of Spain?")
    engine = small_engine(model_and_tokenizer)
    assert finish(engine, "a1", prompt, "tenant-a").cached_tokens == 0
    assert engine.cached_tokens(prompt, "tenant-b") == 0 and engine.cached_tokens(prompt) == 0
    assert finish(engine, "b1", prompt, "tenant-b").cached_tokens == 0
    assert finish(engine, "a2", prompt, "tenant-a").cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert finish(engine, "open", prompt, None).cached_tokens == 0  # nor does a request without a tenant


def test_a_declared_shared_system_prompt_is_reused_across_tenants_and_nothing_after_it(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    shared = list(tok.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    prompt = chat(tok, SYSTEM, "Capital of Spain? " * 3)
    assert prompt[: len(shared)] == shared  # the system turn renders the same alone and before a user turn
    cold = small_engine(model_and_tokenizer, prefix_caching=False).generate(prompt, GREEDY)
    engine = LLMEngine(model, tok.stop_token_ids, small_engine(model_and_tokenizer).config, shared_prefixes=[shared])
    finish(engine, "a", prompt, "tenant-a")
    engine.add_request("b", prompt, GREEDY, tenant="tenant-b")
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [o.token_id for o in outs] == cold
    assert outs[-1].cached_tokens == len(shared) // 16 * 16 > 0  # not the user turn, though its tokens are a's too
    assert finish(engine, "a2", prompt, "tenant-a").cached_tokens == (len(prompt) - 1) // 16 * 16


@pytest.mark.slow  # ~7 s of real-model steps
def test_a_sequence_preempted_for_another_tenant_gives_the_same_greedy_tokens(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = {
        "a0": chat(tok, "Be brief.", "Name a colour."),
        "a1": chat(tok, "Be brief.", "Count to five."),
        "b0": chat(tok, "Be kind.", "What is the capital of Italy?"),
    }
    roomy = small_engine(model_and_tokenizer)
    expected = {rid: roomy.generate(p, params, request_id=rid) for rid, p in prompts.items()}
    engine = small_engine(model_and_tokenizer, max_num_seqs=2)
    engine.add_request("a0", prompts["a0"], params, tenant="a")
    engine.add_request("a1", prompts["a1"], params, tenant="a")
    got: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            assert o.token_id is not None
            got.setdefault(o.request_id, []).append(o.token_id)

    for _ in range(6):
        step()
    engine.add_request("b0", prompts["b0"], params, tenant="b")
    step()
    assert {s.request_id for s in engine.scheduler.running} == {"a0", "b0"}  # a1 gave its slot to b0
    a1 = engine.scheduler.waiting[0]
    assert a1.request_id == "a1" and a1.num_preemptions == 1 and len(a1.output_token_ids) == 6
    while engine.has_work():
        step()
    assert got == expected
    assert no_blocks_held(engine)


def _call_off_in_layer_0(engine: LLMEngine, tenant: str, when: Callable[[int], bool], answers: list[bool]):  # type: ignore[no-untyped-def]
    """While a step runs (inside its first layer, on the engine's thread), a live request of `tenant` arrives at
    the steps `when` picks: what `interrupt_for` answers goes to `answers`. Returns the hook's handle."""
    steps = iter(range(1_000_000))

    def hook(*_: object) -> None:
        if when(next(steps)):
            answers.append(engine.interrupt_for(tenant))

    return engine.runner.model.layers[0].register_forward_hook(hook)


@pytest.mark.parametrize("speculative", [False, True])
def test_steps_called_off_for_a_newcomer_change_no_token_and_never_two_in_a_row(  # type: ignore[no-untyped-def]
    model_and_tokenizer, speculative: bool
) -> None:
    model, tok = model_and_tokenizer
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = {"a0": chat(tok, "Be brief.", "Count to ten."), "a1": chat(tok, "Be brief.", "Say hello twice.")}
    roomy = small_engine(model_and_tokenizer)
    expected = {rid: roomy.generate(p, params, request_id=rid) for rid, p in prompts.items()}
    config = small_engine(model_and_tokenizer, max_num_seqs=2, speculative_policy="always").config
    engine = LLMEngine(model, tok.stop_token_ids, config, proposer=NgramProposer() if speculative else None)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params, tenant="a")
    answers: list[bool] = []
    handle = _call_off_in_layer_0(engine, "b", lambda _: True, answers)  # at every step
    try:
        got = run_all(engine)
    finally:
        handle.remove()
    assert got == expected
    assert answers.count(True) == engine.interrupted_steps > 5  # a's 2 of 2 slots: at its share beside b
    assert "True, True" not in repr(answers)  # the step after a called-off one runs to its end
    assert no_blocks_held(engine)


def test_only_a_newcomer_that_fairness_gives_its_own_step_calls_one_off(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, tok = model_and_tokenizer
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = small_engine(model_and_tokenizer, max_num_seqs=4)
    assert not engine.interrupt_for("b")  # no step runs
    engine.add_request("a0", chat(tok, "Be brief.", "Count to ten."), params, tenant="a")
    answers: dict[str, list[bool]] = {"a": [], "b": []}
    hooks = [_call_off_in_layer_0(engine, t, lambda i: i == 1, answers[t]) for t in ("a", "b")]
    try:
        run_all(engine)
    finally:
        for h in hooks:
            h.remove()
    # a holds 1 of 4 slots, below its share of 2 beside b: b's request just joins the next step; a's own
    # requests never call its steps off
    assert answers == {"a": [False], "b": [False]} and engine.interrupted_steps == 0


def test_a_preempted_sequence_recomputes_its_output_bit_for_bit() -> None:
    """A sequence preempted by recompute gets back the K/V its output tokens had (they are computed again as decode
    rows, as they first were), so every later logit is bit for bit what it would have been, with the fp16 cache
    quantized weights get as well as fp32 (as prompt rows they differed in the last bits, and fp16 rounding turned
    that into different greedy tokens on the real model)."""
    import torch

    from blink.config import EngineConfig
    from blink.models import quant
    from tests.tiny_models import random_llama

    model = quant.convert(random_llama(4), "q4")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    # a1 is preempted 6 tokens into its answer, its positions 20-25 in a block not yet full: they are recomputed
    # (a full block's K/V would come back from the prefix cache)
    prompts = {"a0": [5 + i % 50 for i in range(21)], "a1": [7 + (3 * i) % 60 for i in range(20)], "b0": [9, 8, 7, 6]}

    def engine(kv: str, seqs: int) -> LLMEngine:
        config = EngineConfig(max_model_len=128, kv_cache_mb=4, block_size=16, max_num_seqs=seqs, speculative="off")
        return LLMEngine(model, frozenset(), EngineConfig(**{**config.__dict__, "kv_cache_dtype": kv}))

    def record(e: LLMEngine) -> dict[str, list[torch.Tensor]]:
        """Each request's logits row per emitted token."""
        rows: dict[str, list[torch.Tensor]] = {}
        forward = e.runner.forward

        def recording(batch, *args, **kwargs):  # type: ignore[no-untyped-def]
            logits, where = forward(batch, *args, **kwargs)
            for seq, at in zip(batch.sequences, where, strict=True):
                if at is not None:
                    rows.setdefault(seq.request_id, []).append(logits[at][-1].clone())
            return logits, where

        e.runner.forward = recording  # type: ignore[method-assign]
        return rows

    for kv in ("auto", "fp32"):
        roomy = engine(kv, 4)
        want = record(roomy)
        for rid, prompt in prompts.items():
            roomy.generate(prompt, params, request_id=rid)
        tight = engine(kv, 2)
        assert tight.runner.kv.k[0].dtype == (torch.float16 if kv == "auto" else torch.float32)
        got = record(tight)
        tight.add_request("a0", prompts["a0"], params, tenant="a")
        tight.add_request("a1", prompts["a1"], params, tenant="a")
        for _ in range(6):
            tight.step()
        tight.add_request("b0", prompts["b0"], params, tenant="b")
        tight.step()
        assert any(s.num_preemptions for s in tight.scheduler.waiting), "a1 was meant to give its slot to b0"
        while tight.has_work():
            tight.step()
        for rid in prompts:
            assert len(got[rid]) == len(want[rid]) == 20
            assert all(torch.equal(a, b) for a, b in zip(got[rid], want[rid], strict=True)), (kv, rid)
        assert no_blocks_held(tight)
