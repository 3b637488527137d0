"""Speculative decoding on the real default model: greedy output identical to plain decoding, token for token."""

from __future__ import annotations

import pytest

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.engine.speculation import StepCost
from blink.engine.speculative import DraftModelProposer, NgramProposer
from blink.models import loader, quant

CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""
DOC = (
    "The grey wolf is the largest wild member of the dog family. Grey wolves live in packs of a breeding pair and "
    "their offspring. A pack hunts large prey such as deer, elk and moose, and defends a territory of up to "
    "several hundred square kilometres. Wolves communicate by howling, by scent marking and by body language."
)
QUESTIONS = [
    "Repeat this code exactly:\n\n" + CODE,
    "Rename `total` to `acc` in this code:\n\n" + CODE,
    DOC + "\n\nWhat do grey wolves hunt? Answer from the text.",
    DOC + "\n\nCopy the first sentence of the text.",
    "List the numbers from 1 to 30, separated by commas.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def w8a8(model_dir):  # type: ignore[no-untyped-def]
    model, tok = loader.load(model_dir)
    return quant.convert(model, "w8a8", tok.encode(quant.CALIBRATION_TEXT)), tok


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_greedy_output_with_speculation_equals_plain_decoding(w8a8, model_dir, proposer: str) -> None:  # type: ignore[no-untyped-def]
    model, tok = w8a8
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    config = EngineConfig(max_num_seqs=8, max_model_len=512)
    plain = LLMEngine(model, tok.stop_token_ids, config)
    if proposer == "ngram":
        chosen: NgramProposer | DraftModelProposer = NgramProposer()
    else:  # the same model in fp32 drafts for its w8a8 self: it agrees often, not always
        draft, _ = loader.load(model_dir)
        chosen = DraftModelProposer(draft, config, vocab_size=model.config.vocab_size)
    spec = LLMEngine(model, tok.stop_token_ids, config, proposer=chosen)
    spec.measure_step_cost()
    if isinstance(chosen, DraftModelProposer):  # a 135M draft never pays for a 135M target: make the policy guess
        chosen.step_cost = StepCost()
        for b in range(1, 9):
            chosen.step_cost.observe(b, b, 0.0)
    for max_tokens in (3, 64):
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        expected = [plain.generate(p, params, f"plain{i}") for i, p in enumerate(prompts)]
        for i, p in enumerate(prompts):  # together: verifications and plain decodes share steps
            spec.add_request(f"spec{i}", p, params)
        got: dict[str, list[int]] = {}
        while spec.has_work():
            for o in spec.step():
                assert o.token_id is not None
                got.setdefault(o.request_id, []).append(o.token_id)
        for i in range(len(prompts)):
            assert got[f"spec{i}"] == expected[i], f"prompt {i} ({QUESTIONS[i][:30]!r}) diverged"
        # and one at a time (batch 1: the policy guesses most there)
        for i, p in enumerate(prompts):
            assert spec.generate(p, params, f"alone{i}") == expected[i]
    assert spec.speculation.accepted > 20  # guesses were verified and kept, not just proposed
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks
