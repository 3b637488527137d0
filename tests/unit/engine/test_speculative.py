"""Speculative decoding: proposers, verification and the policy as units; the engine on a toy model for the
statistics (exact distributions are computable there) and for block accounting over many steps."""

from __future__ import annotations

import pytest
import torch

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sampler import Proposal, verify
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import SamplingParams, Sequence
from blink.engine.speculation import AdaptiveSpeculation, StepCost
from blink.engine.speculative import DraftModelProposer, NgramProposer, ngram_lookup
from blink.models import quant
from blink.models.llama import CausalAttention, LlamaConfig, LlamaModel

VOCAB = 6


def toy_model(seed: int, positions: int = 256) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    model = LlamaModel(cfg)
    for p in model.parameters():  # larger weights than the default init: peaked, varied distributions
        torch.nn.init.normal_(p, std=0.5)
    return quant.convert(model.eval(), "w8a8")


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def chi2_pvalue(counts: dict[tuple[int, ...], int], probs: dict[tuple[int, ...], float]) -> float:
    n = sum(counts.values())
    cells = [c for c in probs if probs[c] * n >= 5]  # pool the rare cells into one
    rare_p = sum(p for c, p in probs.items() if c not in cells)
    rare_n = sum(v for c, v in counts.items() if c not in cells)
    stat = sum((counts.get(c, 0) - n * probs[c]) ** 2 / (n * probs[c]) for c in cells)
    if rare_p * n >= 5:
        stat += (rare_n - n * rare_p) ** 2 / (n * rare_p)
        return chi2_sf(stat, len(cells))
    return chi2_sf(stat, len(cells) - 1)


# ---------------------------------------------------------------------------------------------------------------
# prompt lookup


def test_ngram_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    assert ngram_lookup([1, 2, 3, 4, 5, 6, 1, 2, 3], 3) == [4, 5, 6]
    assert ngram_lookup([5, 1, 2, 9, 1, 2, 7, 1, 2], 2) == [7, 1]  # the latest earlier occurrence wins
    assert ngram_lookup([1, 2, 3, 9, 2, 3], 5, max_n=3) == [9, 2, 3]  # longest n first: [9, 2, 3] was never seen
    assert ngram_lookup([1, 2, 3, 4], 3) == []
    assert ngram_lookup([7, 7, 7], 2) == [7]
    assert ngram_lookup([1, 2, 1, 2], 0) == []


def test_ngram_lookup_ignores_matches_that_straddle_token_boundaries() -> None:
    # as bytes, 256 = 00 01 00 00 and 1 = 01 00 00 00: the pattern's bytes occur at an unaligned offset too
    assert ngram_lookup([256, 1, 0, 0, 1, 0], 3) == [0, 1, 0]
    assert ngram_lookup([65536, 0, 9, 256, 0], 2, min_n=2) == []


# ---------------------------------------------------------------------------------------------------------------
# verification


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.full((len(tokens), VOCAB), -10.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return logits


GREEDY = SamplingParams(temperature=0)


def test_greedy_verification_keeps_guesses_while_they_match_then_takes_the_targets_token() -> None:
    logits = one_hot_logits([3, 1, 4, 2])  # the target's argmax after the last token and after each guess
    assert verify(logits, Proposal([3, 1, 4]), GREEDY, None) == [3, 1, 4, 2]  # all kept, plus one
    assert verify(logits, Proposal([3, 5, 4]), GREEDY, None) == [3, 1]  # second rejected: corrected
    assert verify(logits, Proposal([0, 1, 4]), GREEDY, None) == [3]
    with pytest.raises(AssertionError):
        verify(logits, Proposal([3]), GREEDY, None)


@pytest.mark.parametrize("draft", ["one-hot", "distribution"])
def test_sampled_verification_emits_tokens_distributed_as_the_target(draft: str) -> None:
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(2, VOCAB) * 1.5
    p = torch.softmax(logits[0], -1)
    q = torch.softmax(torch.randn(VOCAB) * 1.5, -1)  # the proposer's own distribution, unlike p
    gen = torch.Generator().manual_seed(1)
    counts: dict[tuple[int, ...], int] = {}
    rejected = 0
    for _ in range(20_000):
        if draft == "one-hot":
            proposal = Proposal([2])  # always guesses token 2, as prompt lookup would
        else:
            guess = int(torch.multinomial(q, 1, generator=gen))
            proposal = Proposal([guess], q.unsqueeze(0))
        out = verify(logits, proposal, params, gen)
        rejected += out[0] != proposal.tokens[0]
        counts[(out[0],)] = counts.get((out[0],), 0) + 1
    assert rejected > 1000  # the rule was exercised both ways
    assert chi2_pvalue(counts, {(t,): float(p[t]) for t in range(VOCAB)}) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the policy


def test_step_cost_interpolates_and_scales_from_the_nearest_measured_batch() -> None:
    cost = StepCost(smoothing=0.1)
    assert not cost.known
    cost.observe(1, 1, 10.0)
    cost.observe(1, 3, 14.0)
    cost.observe(4, 4, 20.0)
    cost.observe(4, 8, 26.0)
    assert cost(1, 1) == 10.0
    assert cost(1, 2) == pytest.approx(12.0)  # on its own curve
    assert cost(1, 5) == pytest.approx(18.0)  # extrapolated from the last two points
    assert cost(8, 8) == pytest.approx(40.0)  # nearest curve (4 sequences) at 1 row each, scaled by 2
    assert cost(2, 4) == pytest.approx(2 * 12.0)  # nearest: 1 sequence (tie broken low) at 2 rows, scaled by 2
    cost.observe(8, 8, 30.0)  # one observation for 8 sequences: the 4-sequence shape through it
    assert cost(8, 16) == pytest.approx(30.0 * 26.0 / 20.0)
    assert cost(1, 1, span=2) == pytest.approx(10.0)  # another span, unmeasured: the same span's shape
    cost.observe(1, 1, 20.0)
    assert cost(1, 1) == pytest.approx(11.0)  # an exponential average, not the last sample


def policy(costs: dict[tuple[int, int], float], max_tokens: int = 4) -> AdaptiveSpeculation:
    cost = StepCost()
    for (b, r), t in costs.items():
        cost.observe(b, r, t)
    return AdaptiveSpeculation(max_tokens, cost)


def test_the_policy_guesses_when_rows_are_cheap_and_acceptance_high_and_not_otherwise() -> None:
    flat = {(1, r): 1.0 + 0.02 * r for r in range(1, 6)} | {(16, r): 16.0 + 0.6 * (r - 16) for r in range(16, 97)}
    spec = policy(flat)
    seq = Sequence("a", [1], SamplingParams())
    assert spec.plan([seq], [4], lambda ks: 0.0) == [4]  # cheap rows, prior acceptance 0.5: guess all allowed
    assert spec.plan([seq], [2], lambda ks: 0.0) == [2]  # never past the limit
    # at 16 sequences a guess costs 0.6 of a sequence's share of the step: not worth an expected 0.5 token...
    many = [Sequence(str(i), [1], SamplingParams()) for i in range(16)]
    assert spec.plan(many, [4] * 16, lambda ks: 0.0) == [0] * 16
    # ...unless the measured acceptance is near certain
    for s in many:
        spec.record(s, 100, 99)
    assert sum(spec.plan(many, [4] * 16, lambda ks: 0.0)) > 0


def test_a_sequence_whose_guesses_keep_failing_stops_guessing() -> None:
    costs = {(1, 1): 1.0} | {(1, r): 1.4 + 0.02 * (r - 2) for r in range(2, 7)}  # int8's one-row fast path
    spec = policy(costs)
    seq = Sequence("a", [1], SamplingParams())
    assert spec.plan([seq], [4], lambda ks: 0.0) == [4]  # a fresh engine's rate, 1/2, makes 4 guesses pay
    for _ in range(10):
        spec.record(seq, 4, 0)
    assert spec.acceptance(seq) < 0.2
    assert spec.plan([seq], [4], lambda ks: 0.0) == [0]
    # and a new sequence starts from the engine's (now low) rate
    assert spec.plan([Sequence("b", [1], SamplingParams())], [4], lambda ks: 0.0) == [0]


def test_the_policy_looks_past_an_expensive_first_row() -> None:
    # one row takes int8's fast path: the second costs 40% more, each one after that 2%
    costs = {(1, 1): 1.0} | {(1, r): 1.4 + 0.02 * (r - 2) for r in range(2, 7)}
    spec = policy(costs, max_tokens=5)
    seq = Sequence("a", [1], SamplingParams())
    spec.record(seq, 10, 8)  # acceptance ~0.8: 1 + .8 + .64 + ... tokens for ~1.5x the time
    assert spec.plan([seq], [5], lambda ks: 0.0) == [5]


def test_expected_speedup_formula() -> None:
    assert AdaptiveSpeculation.expected_speedup(0.0, 4, 0.0) == 1.0
    assert AdaptiveSpeculation.expected_speedup(1.0, 4, 0.0) == 5.0
    assert AdaptiveSpeculation.expected_speedup(0.5, 2, 0.25) == pytest.approx((1 - 0.125) / (0.5 * 1.5))


# ---------------------------------------------------------------------------------------------------------------
# the engine on a toy model


def toy_engine(model: LlamaModel, proposer: str = "ngram") -> LLMEngine:
    """An engine on the toy model with prompt lookup or a draft (another toy model); its policy is told extra rows
    and draft steps cost nothing, so it guesses whenever it can (these tests are about what guessing does, not when
    it pays)."""
    config = EngineConfig(max_num_seqs=16, max_model_len=128, kv_cache_mb=1, block_size=4)
    chosen = (
        NgramProposer(min_n=1) if proposer == "ngram" else DraftModelProposer(toy_model(99), config, vocab_size=VOCAB)
    )
    engine = LLMEngine(model, frozenset(), config, proposer=chosen)
    for b in range(1, 17):
        for r in range(b, 6 * b + 1):
            engine.step_cost.observe(b, r, 1.0)
        if isinstance(chosen, DraftModelProposer):
            chosen.step_cost.observe(b, b, 0.0)
    engine.step_cost.smoothing = 0.0  # and keep believing it: real steps don't change these costs
    engine.speculation.probe_every = 1  # nor what guessing delivers
    if isinstance(chosen, DraftModelProposer):
        chosen.step_cost.smoothing = 0.0
    return engine


def exact_distribution(model: LlamaModel, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(second, third generated token) at temperature 1, summed over the first."""

    def next_probs(tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            n = len(tokens)
            logits = model(torch.tensor(tokens), torch.arange(n), CausalAttention(), torch.tensor([n - 1]))
        return torch.softmax(logits[0].double(), -1)

    out: dict[tuple[int, ...], float] = {}
    p1 = next_probs(prompt)
    for t1 in range(VOCAB):
        p2 = next_probs([*prompt, t1])
        for t2 in range(VOCAB):
            p3 = next_probs([*prompt, t1, t2])
            for t3 in range(VOCAB):
                out[(t2, t3)] = out.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return out


@pytest.mark.parametrize("proposer", ["ngram", pytest.param("draft", marks=pytest.mark.slow)])
def test_sampling_with_speculation_matches_the_targets_distribution(proposer: str) -> None:
    model = toy_model(0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive: prompt lookup guesses most steps
    engine = toy_engine(model, proposer)
    counts: dict[tuple[int, ...], int] = {}
    for batch in range(160):
        for i in range(16):
            engine.add_request(
                f"{batch}-{i}", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=batch * 16 + i)
            )
        outs: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o.token_id)  # type: ignore[arg-type]
        for tokens in outs.values():
            assert len(tokens) == 3
            counts[tuple(tokens[1:])] = counts.get(tuple(tokens[1:]), 0) + 1
    assert engine.speculation.proposed > 500  # speculation ran...
    assert 0 < engine.speculation.accepted < engine.speculation.proposed  # ...with both outcomes
    assert chi2_pvalue(counts, exact_distribution(model, prompt)) > 1e-3


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_greedy_tokens_with_speculation_equal_plain_decoding_on_a_toy_model(proposer: str) -> None:
    model = toy_model(1)
    prompts = [[1, 2, 3] * k + [4] * (k % 3) for k in range(1, 13)]
    plain = LLMEngine(model, frozenset({5}), EngineConfig(max_num_seqs=16, max_model_len=128, block_size=4))
    spec = toy_engine(model, proposer)
    spec.stop_token_ids = frozenset({5})
    for n in (1, 2, 3, 7, 40):
        params = SamplingParams(max_tokens=n, temperature=0)
        expected = [plain.generate(p, params, f"p{i}") for i, p in enumerate(prompts)]
        for i, p in enumerate(prompts):  # all at once: verifications share steps
            spec.add_request(f"s{i}", p, params)
        got: dict[str, list[int]] = {}
        while spec.has_work():
            for o in spec.step():
                got.setdefault(o.request_id, []).append(o.token_id)  # type: ignore[arg-type]
        assert [got[f"s{i}"] for i in range(len(prompts))] == expected
    assert spec.speculation.accepted > 10  # kept guesses (a random draft agrees less than prompt lookup)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_seeded_sampling_with_speculation_gives_the_tokens_of_plain_decoding(proposer: str) -> None:
    model = toy_model(1)
    prompts = [[1, 2, 3] * k + [4] * (k % 3) for k in range(1, 13)]
    plain = LLMEngine(model, frozenset(), EngineConfig(max_num_seqs=16, max_model_len=128, block_size=4))
    spec = toy_engine(model, proposer)
    params = [SamplingParams(max_tokens=20, temperature=0.9, seed=100 + i) for i in range(len(prompts))]
    expected = [plain.generate(p, params[i], f"p{i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        spec.add_request(f"s{i}", p, params[i])
    got: dict[str, list[int]] = {}
    while spec.has_work():
        for o in spec.step():
            got.setdefault(o.request_id, []).append(o.token_id)  # type: ignore[arg-type]
    assert [got[f"s{i}"] for i in range(len(prompts))] == expected
    assert spec.speculation.accepted > 10  # guesses were kept: the same tokens, fewer steps


def blocks_consistent(engine: LLMEngine) -> None:
    """Every running sequence holds exactly the blocks of its computed tokens (no rejected guess's block left
    behind), and every block is either free or referenced."""
    referenced = {b for s in engine.scheduler.running for b in engine.blocks.table(s.request_id)}
    for seq in engine.scheduler.running:
        assert len(engine.blocks.table(seq.request_id)) == engine.blocks.blocks_for(seq.num_computed)
    held = [b for b in engine.blocks.blocks if b.ref_count > 0]
    assert {b.block_id for b in held} == referenced
    assert engine.blocks.num_free_blocks + len(held) == engine.blocks.num_blocks


@pytest.mark.slow  # a thousand engine steps (~6 s a proposer)
@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_no_block_leaks_over_a_thousand_steps_of_guesses_rejections_and_aborts(proposer: str) -> None:
    model = toy_model(2)
    engine = toy_engine(model, proposer)
    rng = torch.Generator().manual_seed(0)
    for i in range(1000):
        if engine.num_running + engine.num_waiting < 12:
            prompt = torch.randint(0, VOCAB, (int(torch.randint(2, 30, (), generator=rng)),), generator=rng).tolist()
            temperature = [0.0, 1.0][i % 2]
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40, temperature=temperature, seed=i))
        if i % 7 == 0 and engine.scheduler.running:  # cancel one mid-stream, right after it verified guesses
            engine.abort(engine.scheduler.running[i % len(engine.scheduler.running)].request_id)
        engine.step()
        blocks_consistent(engine)
    assert engine.speculation.accepted < engine.speculation.proposed  # rejections happened
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    if isinstance(engine.proposer, DraftModelProposer):  # the draft's own cache too
        assert engine.proposer.blocks.num_free_blocks == engine.proposer.blocks.num_blocks


def test_a_stop_token_inside_the_kept_guesses_ends_the_stream_there() -> None:
    model = toy_model(1)
    prompt = [1, 2, 3] * 6
    params = SamplingParams(max_tokens=60, temperature=0)
    plain = LLMEngine(model, frozenset(), EngineConfig(max_num_seqs=4, max_model_len=128, block_size=4))
    free_run = plain.generate(prompt, params)
    stop = free_run[len(free_run) // 2]  # a token the greedy stream emits mid-way
    plain.stop_token_ids = frozenset({stop})
    expected = plain.generate(prompt, params, "again")
    spec = toy_engine(model)
    spec.stop_token_ids = frozenset({stop})
    spec.add_request("s", prompt, params)
    got, last = [], None
    while spec.has_work():
        for o in spec.step():
            got.append(o.token_id)
            last = o
    assert got == expected and got[-1] == stop
    assert last is not None and last.finished and last.spec_accepted > 0
    assert spec.blocks.num_free_blocks == spec.blocks.num_blocks


@pytest.mark.parametrize("splits", [[37], [1] * 37, [5, 11, 16, 5], [16, 3, 3, 15], [2, 30, 5]])
def test_a_prompts_numbers_do_not_depend_on_how_it_was_chunked(splits: list[int]) -> None:
    """Chunked prefill around other streams, pre-loads and prefix hits split prompts anywhere: the K/V and the
    last row's logits must be bit for bit those of a prefill in one piece, or greedy output would change."""
    model = toy_model(3)
    prompt = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        engine = LLMEngine(model, frozenset(), EngineConfig(max_num_seqs=2, max_model_len=128, block_size=16))
        seq = Sequence("s", prompt, SamplingParams(temperature=0))
        engine.runner.add(seq)
        logits = torch.empty(0)
        for n in sizes:
            assert engine.blocks.allocate("s", seq.num_computed + n)
            table = engine.blocks.table("s")
            logits, _ = engine.runner.forward(ScheduledBatch([seq], [n]), [table])
            seq.num_computed += n
        slots = engine.runner._context(engine.blocks.table("s"), len(prompt))
        kv = torch.stack(
            [torch.stack([k[slots], v[slots]]) for k, v in zip(engine.runner.kv.k, engine.runner.kv.v, strict=True)]
        )
        return kv, logits

    whole_kv, whole_logits = prefill([37])
    kv, logits = prefill(splits)
    assert torch.equal(kv, whole_kv)
    assert torch.equal(logits, whole_logits)


def test_the_policy_stops_guessing_where_guessing_delivered_fewer_tokens_per_second() -> None:
    costs = {(1, r): 1.0 + 0.02 * r for r in range(1, 7)}  # the estimate: guessing is nearly free
    spec = policy(costs, max_tokens=4)
    seq = Sequence("a", [1], SamplingParams())
    assert spec.plan([seq], [4], lambda ks: 0.0) == [4]
    spec.observe_step(1, 1, guessed=True, tokens=2, seconds=1.0)  # what actually happened: 2 tok/s guessing...
    spec.observe_step(1, 1, guessed=False, tokens=3, seconds=1.0)  # ...3 tok/s not
    plans = [spec.plan([seq], [4], lambda ks: 0.0) for _ in range(spec.probe_every)]
    assert plans.count([0]) == spec.probe_every - 1  # held back, but for one probe that keeps measuring
    assert plans[-1] == [4]
    assert spec.plan([seq], [4], lambda ks: 0.0, span=2) == [4]  # another key span: its own record
    spec.observe_step(1, 1, guessed=True, tokens=8, seconds=1.0)  # guessing got better: it resumes
    assert spec.plan([seq], [4], lambda ks: 0.0) == [4]


def test_a_batch_size_that_never_guesses_still_probes_now_and_then() -> None:
    costs = {(1, 1): 1.0} | {(1, r): 2.0 for r in range(2, 7)}  # guessing looks ruinous at the prior rate
    spec = policy(costs, max_tokens=4)
    seq = Sequence("a", [1], SamplingParams())
    plans = [spec.plan([seq], [4], lambda ks: 0.0) for _ in range(2 * spec.probe_every)]
    assert plans[:-1] == [[0]] * (2 * spec.probe_every - 1)
    assert plans[-1] == [2]  # a probe: 2 guesses, whose outcome corrects the estimate
    for _ in range(5):
        spec.record(seq, 2, 2)  # they were right, again and again
    assert spec.plan([seq], [4], lambda ks: 0.0) == [4]


def test_the_always_policy_guesses_its_most_whatever_the_costs_and_acceptance_say() -> None:
    costs = {(1, 1): 1.0} | {(1, r): 2.0 for r in range(2, 7)}  # the adaptive policy would guess nothing here
    spec = AdaptiveSpeculation(4, StepCost(), always=True)  # not even measured costs are needed
    for (b, r), t in costs.items():
        spec.step_cost.observe(b, r, t)
    seqs = [Sequence(str(i), [1], SamplingParams()) for i in range(3)]
    for _ in range(10):
        spec.record(seqs[0], 4, 0)  # and its guesses keep failing
    spec.observe_step(3, 1, guessed=True, tokens=1, seconds=1.0)
    spec.observe_step(3, 1, guessed=False, tokens=3, seconds=1.0)
    assert spec.plan(seqs, [4, 2, 0], lambda ks: 0.0) == [4, 2, 0]  # at most each sequence's limit
    assert policy(costs).plan(seqs[:1], [4], lambda ks: 0.0) == [0]  # the adaptive policy, for contrast


def test_measuring_step_costs_fits_a_small_kv_pool() -> None:
    # 16 sequences of ~600 tokens don't fit 1 MiB of this toy's KV: those sizes are skipped, not an error
    # (measured: `blink serve --kv-cache-mb 256` failed its warm-up on the default model)
    config = EngineConfig(max_num_seqs=16, max_model_len=1024, kv_cache_mb=1, block_size=16)
    engine = LLMEngine(toy_model(4, positions=1024), frozenset(), config, proposer=NgramProposer())
    costs = engine.measure_step_cost()
    assert "1x1@1024" in costs and "16x16@512" in costs
    assert "16x16@1024" not in costs
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
