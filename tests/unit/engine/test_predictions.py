"""Predicted Outputs in the engine: a request's own prediction is verified as guesses, so the output is plain
decoding's, and what was kept or rejected of it is counted (speculator.py)."""

from __future__ import annotations

import pytest

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams, StepOutput
from blink.engine.speculative import DraftModelProposer, NgramProposer
from blink.engine.speculator import prediction_lookup
from tests.unit.engine.test_speculative import VOCAB, chi2_pvalue, exact_distribution, toy_model

# ---------------------------------------------------------------------------------------------------------------
# where the answer stands in the prediction


def test_the_lookup_follows_the_prediction_from_its_start() -> None:
    prediction = [7, 8, 9, 10, 11, 12]
    assert prediction_lookup([7], prediction, 0, 3) == (1, 1)  # one token so far: it alone places the answer
    assert prediction_lookup([7, 8, 9], prediction, 1, 3) == (3, 3)
    assert prediction_lookup([7, 8, 9, 10, 11, 12], prediction, 5, 3) == (-1, 0)  # at its end: nothing follows


def test_the_lookup_finds_the_answer_again_after_an_edit() -> None:
    prediction = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # the answer replaced 4 by 40 and went on as predicted: matched again by its last two tokens
    assert prediction_lookup([1, 2, 3, 40, 5, 6], prediction, 3, 2) == (6, 2)
    assert prediction_lookup([1, 2, 3, 40, 41], prediction, 3, 2) == (-1, 0)  # new text: no guess


def test_the_lookup_prefers_the_occurrence_after_where_the_answer_stood() -> None:
    prediction = [1, 2, 3, 1, 2, 4, 1, 2, 5]  # "1 2" three times
    assert prediction_lookup([9, 1, 2], prediction, 5, 1) == (5, 2)  # the one ending where the answer stood
    assert prediction_lookup([9, 1, 2], prediction, 7, 1) == (8, 2)  # the first one after that
    assert prediction_lookup([9, 1, 2], prediction, 0, 1) == (2, 2)
    assert prediction_lookup([9, 1, 2], prediction, 9, 1) == (2, 2)  # none after it: the first anywhere


# ---------------------------------------------------------------------------------------------------------------
# the engine on a toy model


def engine_with(proposer: str, seed: int = 1) -> LLMEngine:
    """An engine whose policy is told extra rows cost nothing (these tests are about what guessing does)."""
    config = EngineConfig(max_num_seqs=16, max_model_len=128, kv_cache_mb=1, block_size=4, prediction_tokens=8)
    chosen = {
        "off": None,
        "ngram": NgramProposer(min_n=1),
        "draft": DraftModelProposer(toy_model(99), config, vocab_size=VOCAB) if proposer == "draft" else None,
    }[proposer]
    engine = LLMEngine(toy_model(seed), frozenset(), config, proposer=chosen)
    for b in range(1, 17):
        for r in range(b, 9 * b + 1):
            engine.step_cost.observe(b, r, 1.0)
        if isinstance(chosen, DraftModelProposer):
            chosen.step_cost.observe(b, b, 0.0)
    engine.step_cost.smoothing = 0.0
    engine.speculation.probe_every = 1
    return engine


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], list[int] | None]], params: SamplingParams) -> dict:
    """All requests at once -> {id: (tokens, last output)}."""
    for rid, (prompt, prediction) in requests.items():
        engine.add_request(rid, prompt, params, prediction=prediction)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    last: dict[str, StepOutput] = {}
    while engine.has_work():
        for o in engine.step():
            if o.token_id is not None:
                tokens[o.request_id].append(o.token_id)
            last[o.request_id] = o
    return {rid: (tokens[rid], last[rid]) for rid in requests}


PROMPTS = [[1, 2, 3] * k + [4] * (k % 3) for k in range(1, 9)]


@pytest.mark.parametrize("proposer", ["off", "ngram", "draft"])
def test_greedy_output_with_a_prediction_is_plain_decodings_and_an_exact_one_is_kept(proposer: str) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = run(engine_with("off"), {str(i): (p, None) for i, p in enumerate(PROMPTS)}, params)
    exact = {str(i): (p, plain[str(i)][0]) for i, p in enumerate(PROMPTS)}  # the prediction is the answer
    edited = {}  # the answer with two tokens changed and one inserted: an edit
    for i, p in enumerate(PROMPTS):
        answer = list(plain[str(i)][0])
        answer[5] = (answer[5] + 1) % VOCAB
        answer[15] = (answer[15] + 2) % VOCAB
        edited[f"e{i}"] = (p, [*answer[:20], answer[20], *answer[20:]])
    engine = engine_with(proposer)
    got = run(engine, exact | edited, params)
    for i in range(len(PROMPTS)):
        assert got[str(i)][0] == plain[str(i)][0]
        assert got[f"e{i}"][0] == plain[str(i)][0]
        final = got[str(i)][1]
        # every token but the first (the prefill's) can come from an exact prediction
        assert final.prediction_accepted >= 20 and final.prediction_rejected <= 3
        assert got[f"e{i}"][1].prediction_rejected > 0  # the edits were rejected...
        assert got[f"e{i}"][1].prediction_accepted >= 10  # ...and most of the rest kept
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # rejected guesses left no block behind


def test_an_unrelated_prediction_changes_nothing_but_what_it_costs() -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = run(engine_with("ngram"), {str(i): (p, None) for i, p in enumerate(PROMPTS)}, params)
    unrelated = {str(i): (p, [5, 0] * 20) for i, p in enumerate(PROMPTS)}
    got = run(engine_with("ngram"), unrelated, params)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in plain.items()}


def test_out_of_vocabulary_prediction_tokens_are_dropped_not_guessed() -> None:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plain = run(engine_with("off"), {"a": (PROMPTS[0], None)}, params)
    answer = plain["a"][0]
    noisy = [t for a in answer for t in (a, VOCAB + 7, -1)]
    got = run(engine_with("off"), {"a": (PROMPTS[0], noisy)}, params)
    assert got["a"][0] == answer
    assert got["a"][1].prediction_accepted >= 8


def test_sampling_with_a_prediction_keeps_the_targets_distribution() -> None:
    model_seed = 0
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    engine = engine_with("off", seed=model_seed)
    counts: dict[tuple[int, ...], int] = {}
    for batch in range(100):
        requests = {f"{batch}-{i}": (prompt, [i % VOCAB, 3, 1, 2]) for i in range(16)}
        for rid, (p, prediction) in requests.items():
            seed = batch * 16 + int(rid.split("-")[1])
            engine.add_request(rid, p, SamplingParams(max_tokens=3, temperature=1.0, seed=seed), prediction=prediction)
        outs: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o.token_id)  # type: ignore[arg-type]
        for tokens in outs.values():
            counts[tuple(tokens[1:])] = counts.get(tuple(tokens[1:]), 0) + 1
    assert 0 < engine.speculation.accepted < engine.speculation.proposed  # predictions were verified, both ways
    assert chi2_pvalue(counts, exact_distribution(toy_model(model_seed), prompt)) > 1e-3
