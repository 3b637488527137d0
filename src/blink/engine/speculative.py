"""Speculative decoding: a proposer guesses a sequence's next tokens, the target model checks them all in one step.

    proposal = proposer.propose(seqs, lengths)    # up to lengths[i] guessed tokens per sequence
    tokens = verify(logits, proposal, params, gen) # the target's rows for [last token, guesses...] -> tokens to emit

The runner feeds a decoding sequence's last token and its k guesses through the model as k + 1 decode rows, each
attending to exactly the positions before it (the same arithmetic as plain decoding, row for row), so row i's
logits are the target's distribution for the token after guess i. `verify` then keeps guesses while they agree:

- greedy: guess i is kept while it equals the argmax of row i; the first disagreement is replaced by that argmax,
  and when all k are kept row k gives one more. The tokens are exactly those plain greedy decoding would give.
- sampling: guess x_i drawn from the proposer's q_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); the
  first rejected one is replaced by a draw from max(0, p_i - q_i), normalised; all kept: one more from p_k. Each
  emitted token is then distributed exactly as the target's p (Leviathan et al. 2023, Chen et al. 2023). A
  deterministic proposer (prompt lookup) has q_i = one-hot(x_i).

The engine commits the emitted tokens and the K/V of the kept rows; the rejected rows' K/V lie beyond the
sequence's computed length, are overwritten later, and their blocks are returned (`BlockManager.trim`).

Proposers: `NgramProposer` (prompt lookup: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens; no second model) and `DraftModelProposer` (a smaller model with the same vocabulary and
its own paged KV cache). `AdaptiveSpeculation` decides how many guesses each sequence gets in a step from the
measured acceptance rates and the measured cost of a step as a function of its rows (see its docstring).
"""

from __future__ import annotations

import dataclasses
import math
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from typing import Protocol

import torch

from blink.config import EngineConfig
from blink.engine.kv_cache import BlockManager
from blink.engine.runner import ModelRunner, PagedKVCache
from blink.engine.sampler import Proposal, draw, probabilities
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import SamplingParams, Sequence
from blink.models.llama import LlamaModel


class Proposer(Protocol):
    name: str
    # True: proposing is cheap and tells how many guesses exist (prompt lookup), so the engine proposes first and
    # plans within what was found; False: plan first, then propose only what the plan asks for (a draft model)
    proposes_first: bool

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:
        """At most lengths[i] guesses of the tokens that follow seqs[i].token_ids."""
        ...

    def cost(self, lengths: list[int]) -> float:
        """Seconds proposing `lengths` guesses takes (0 for a proposer without a model)."""
        ...

    def measure(self, counts: list[int], context: int) -> None:
        """Time the proposer's own steps for these batch sizes (a model's; nothing for prompt lookup)."""
        ...

    def remove(self, request_id: str) -> None:
        """The sequence is gone: drop any state kept for it."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# prompt lookup


def ngram_lookup(tokens: list[int], k: int, *, max_n: int = 4, min_n: int = 2) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens of `tokens` (n from max_n
    down to min_n); [] if none of them occurred before."""
    if k < 1 or len(tokens) <= min_n:
        return []
    data = array("i", tokens).tobytes()  # searched in C by bytes.rfind: ~1,000x faster than a Python loop
    size = 4
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = data[-n * size :]
        end = len(data) - size  # the match must end before the last token, so a token follows it
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % size == 0:
                first = at // size + n
                return tokens[first : first + k]
            end = at + len(pattern) - 1  # an unaligned hit: look further left
    return []


class NgramProposer:
    """Prompt lookup: no model, nothing to roll back. Strong when the answer copies from its input (summaries,
    answers from a pasted document, edits of pasted code)."""

    name = "ngram"
    proposes_first = True

    def __init__(self, *, max_n: int = 4, min_n: int = 2) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:
        return [
            Proposal(ngram_lookup(s.token_ids, k, max_n=self.max_n, min_n=self.min_n))
            for s, k in zip(seqs, lengths, strict=True)
        ]

    def cost(self, lengths: list[int]) -> float:
        return 0.0

    def measure(self, counts: list[int], context: int) -> None:
        pass

    def remove(self, request_id: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# draft model


class DraftModelProposer:
    """A smaller model with the target's vocabulary guesses k tokens, one decode step each, batched over the
    sequences that guess. It keeps its own paged KV cache (and block manager, without prefix caching: its K/V
    include its own guesses, which are rolled back): each sequence has a shadow whose computed positions are cut
    back to what still agrees with the target's tokens before each proposal, then caught up (the prompt, and the
    tokens the target emitted), at most `catch_up_tokens` per sequence and step (a long prompt makes its first
    guesses wait a few steps instead of stalling every stream)."""

    name = "draft"
    proposes_first = False

    def __init__(self, model: LlamaModel, config: EngineConfig, *, vocab_size: int, catch_up_tokens: int = 256) -> None:

        dtype = model.embed_tokens.weight.dtype
        num_blocks = config.kv_cache_mb * 2**20 // PagedKVCache.bytes_per_block(model, config.block_size, dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=False)
        self.runner = ModelRunner(
            model, num_blocks=num_blocks, block_size=config.block_size, native_kernels=config.native_kernels
        )
        self.vocab_size = vocab_size
        self.catch_up_tokens = catch_up_tokens
        self.step_cost = StepCost()
        self._shadows: dict[str, Sequence] = {}

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of `seq`, its computed positions cut back to those still agreeing with seq's tokens."""
        tokens = seq.token_ids
        shadow = self._shadows.get(seq.request_id)
        if shadow is None:
            params = seq.params
            if params.seed is not None:  # its own stream of draws, reproducible with the request's
                params = dataclasses.replace(params, seed=params.seed + 1)
            shadow = self._shadows[seq.request_id] = Sequence(seq.request_id, tokens, params)
            self.runner.add(shadow)
            return shadow
        old = shadow.token_ids
        agree = 0
        limit = min(shadow.num_computed, len(tokens))
        while agree < limit and old[agree] == tokens[agree]:
            agree += 1
        shadow.num_computed = agree
        shadow.prompt_token_ids, shadow.output_token_ids = tokens, []
        self.blocks.trim(seq.request_id, agree)
        return shadow

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:

        out = [Proposal() for _ in seqs]
        guessing: list[tuple[int, Sequence, int]] = []  # (index, shadow, guesses wanted)
        chunks: list[int] = []
        for i, (seq, k) in enumerate(zip(seqs, lengths, strict=True)):
            if k < 1:
                continue
            shadow = self._sync(seq)
            behind = shadow.num_tokens - shadow.num_computed
            n = min(behind, self.catch_up_tokens)
            if not self.blocks.allocate(seq.request_id, shadow.num_computed + n):
                continue
            guessing.append((i, shadow, k if n == behind else 0))
            chunks.append(n)
        probs: dict[int, list[torch.Tensor]] = {}
        while guessing:
            shadows = [g[1] for g in guessing]
            batch = ScheduledBatch(shadows, chunks)
            tables = [self.blocks.table(s.request_id) for s in shadows]
            started = time.perf_counter()
            logits, where = self.runner.forward(batch, tables)
            if all(n == 1 for n in chunks):  # a decode step: what `cost` predicts
                self.step_cost.observe(len(shadows), len(shadows), time.perf_counter() - started)
            following: list[tuple[int, Sequence, int]] = []
            for (i, shadow, k), n, w in zip(guessing, chunks, where, strict=True):
                shadow.num_computed += n
                if w is None or k < 1:  # still catching up: no guesses this step
                    continue
                row = logits[w.start]
                if shadow.params.greedy:
                    token = int(row.argmax())
                else:
                    q = _fit(probabilities(row, shadow.params), self.vocab_size)
                    token = draw(q, self.runner.generator(shadow.request_id))
                    probs.setdefault(i, []).append(q)
                out[i].tokens.append(token)
                shadow.output_token_ids.append(token)
                if len(out[i].tokens) < k and self.blocks.allocate(shadow.request_id, shadow.num_computed + 1):
                    following.append((i, shadow, k))
            guessing, chunks = following, [1] * len(following)
        for i, rows in probs.items():
            out[i].probs = torch.stack(rows)
        return out

    def cost(self, lengths: list[int]) -> float:
        """One draft decode step per guess depth, each over the sequences guessing that deep."""
        total = 0.0
        for depth in range(1, max(lengths, default=0) + 1):
            count = sum(1 for k in lengths if k >= depth)
            total += self.step_cost(count, count)
        return total

    def measure(self, counts: list[int], context: int) -> None:

        def run(count: int, rows: int, span: int) -> None:
            shadows = [Sequence(f"measure-{j}", [0] * context, SamplingParams(), [0]) for j in range(count)]
            try:
                for shadow in shadows:
                    shadow.num_computed = context
                    if not self.blocks.allocate(shadow.request_id, context + 1):
                        raise RuntimeError("the draft's KV pool is too small to measure step costs")
                tables = [self.blocks.table(s.request_id) for s in shadows]
                self.runner.forward(ScheduledBatch(shadows, [1] * count), tables)
            finally:
                for shadow in shadows:
                    self.blocks.free(shadow.request_id)

        self.step_cost.measure([(b, b, 1) for b in counts], run)

    def remove(self, request_id: str) -> None:
        if self._shadows.pop(request_id, None) is not None:
            self.blocks.free(request_id)
            self.runner.remove(request_id)


def _fit(probs: torch.Tensor, size: int) -> torch.Tensor:
    """The draft's distribution over the target's vocabulary size (padding rows of either side get 0)."""
    if probs.shape[0] == size:
        return probs
    if probs.shape[0] > size:
        return probs[:size]
    return torch.nn.functional.pad(probs, (0, size - probs.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# the policy


class StepCost:
    """Seconds a decode-only step takes for `seqs` sequences, `rows` decode rows (one per sequence plus its
    guesses) and keys padded to `span` x 512 positions (the runner pads decode keys to multiples of 512, so a
    step's attention cost moves in those steps), measured on this machine.

    Not linear: torch's int8 matmul has a fast path for one row (measured: 2 rows cost ~1.5x one), each sequence
    adds its own attention, and attention grows with the span. So the costs are a table, seeded by `measure` (the
    replica's warm-up times forwards of a grid of sizes) and refined by `observe` from real steps (exponential
    average per size). An unmeasured size is read off the same (seqs, span) curve over rows when it has two
    points; otherwise off the nearest measured curve's shape (same span first, then the nearest sequence count,
    at the same rows per sequence), scaled to pass through what was observed for this (seqs, span). The policy
    only compares costs of one batch with and without guesses, so a common scale cancels out."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self._table: dict[tuple[int, int, int], float] = {}
        self._curves: dict[tuple[int, int], list[tuple[int, float]]] = {}  # (seqs, span) -> sorted (rows, s)

    @property
    def known(self) -> bool:
        return bool(self._table)

    def observe(self, seqs: int, rows: int, seconds: float, span: int = 1) -> None:
        key = (seqs, rows, span)
        old = self._table.get(key)
        new = self._table[key] = seconds if old is None else old + self.smoothing * (seconds - old)
        curve = self._curves.setdefault((seqs, span), [])  # every decode step lands here: update in place
        i = bisect_left(curve, (rows, -math.inf))
        if i < len(curve) and curve[i][0] == rows:
            curve[i] = (rows, new)
        else:
            curve.insert(i, (rows, new))

    def measure(
        self, sizes: list[tuple[int, int, int]], run: Callable[[int, int, int], None], repeats: int = 2
    ) -> None:
        """Time `run(seqs, rows, span)` for each size (the fastest of `repeats`, after one untimed call)."""
        for seqs, rows, span in sizes:
            run(seqs, rows, span)
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                run(seqs, rows, span)
                best = min(best, time.perf_counter() - t)
            self.observe(seqs, rows, best, span)

    @staticmethod
    def _interpolate(curve: list[tuple[int, float]], rows: float) -> float:
        if len(curve) == 1:
            return curve[0][1] * rows / curve[0][0]
        i = min(max(bisect_left(curve, (rows, -math.inf)), 1), len(curve) - 1)
        (x0, y0), (x1, y1) = curve[i - 1], curve[i]
        return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)

    def __call__(self, seqs: int, rows: int, span: int = 1) -> float:
        exact = self._table.get((seqs, rows, span))
        if exact is not None:
            return exact
        if not self._curves:
            return float(rows)  # unmeasured: every row costs the same (speculation never pays)
        own = self._curves.get((seqs, span), [])
        if len(own) >= 2:
            return max(1e-6, self._interpolate(own, rows))
        shaped = [k for k, c in self._curves.items() if len(c) >= 2] or list(self._curves)
        b, p = min(shaped, key=lambda k: (k[1] != span, abs(math.log(k[0] / seqs)), abs(k[1] - span), k[0]))

        def shape(r: float) -> float:
            return self._interpolate(self._curves[(b, p)], r * b / seqs)

        if own:  # one observation for this batch: the reference shape through it
            r0, t0 = own[0]
            return max(1e-6, shape(rows) * t0 / shape(r0))
        return max(1e-6, shape(rows) * seqs / b)

    def snapshot(self) -> dict[str, float]:
        return {f"{b}x{r}@{p * 512}": t for (b, r, p), t in sorted(self._table.items())}


class AdaptiveSpeculation:
    """How many guesses each decoding sequence gets this step.

    A sequence whose guesses are each accepted with probability a, given k guesses, emits on average
    1 + a + ... + a^k tokens in a step. The step costs `step_cost(seqs, rows)` (rows: one per sequence plus all guesses)
    plus the proposer's own cost. Starting from no guesses, the policy adds guesses one at a time, each time to
    the sequence whose next guess is most likely accepted (marginal gain a^(k+1)), while doing so raises the
    expected tokens per second of the whole step, and takes the best point on that path; so it proposes more where
    acceptance is high and, when the batch is large enough that extra rows cost more than they return, nothing.
    Acceptance a is estimated per token: a verification that kept j of k guesses is j successes in j trials if
    j == k, else j + 1 trials (guessing stops at the first miss). A sequence's estimate blends its own recent
    counts (exponentially forgotten) with the engine's recent rate, which seeds new sequences; a sequence that
    gets no guesses forgets its own counts step by step, drifting back to the engine's rate, so one bad stretch
    doesn't stop it guessing for good. Costs per batch size: StepCost.

    And a check on the result: for each batch size and key span the engine reports the tokens per second its
    decode steps actually delivered, with and without guesses (`observe_step`). Where guessing delivered less, the
    policy stops guessing for that size, except for one probe step in `probe_every` that keeps the comparison
    current: the estimates above can be wrong (costs measured on short contexts, acceptance drifting), the
    delivered rate is what counts. Conversely, after 2 x `probe_every` steps of a batch size without a guess, one
    sequence gets 2 guesses: otherwise an acceptance estimate that starts too low (a new server's 1/2, when a
    draft model agrees 98% of the time) would never be corrected.

    `always` (--speculative-policy always) skips all of this: every sequence gets max_tokens guesses."""

    def __init__(
        self,
        max_tokens: int,
        step_cost: StepCost,
        prior_weight: float = 2.0,
        probe_every: int = 16,
        *,
        always: bool = False,
    ) -> None:
        self.max_tokens = max_tokens
        self.always = always  # --speculative-policy always: every sequence max_tokens guesses, whatever they cost
        self.step_cost = step_cost
        self.prior_weight = prior_weight
        self.probe_every = probe_every
        self._delivered: dict[tuple[int, int, bool], float] = {}  # (seqs, span, guessed) -> tokens/s, averaged
        self._held_back: dict[tuple[int, int], int] = {}  # steps not guessing since the last probe
        self._idle: dict[tuple[int, int], int] = {}  # steps the plan gave no guess, per (seqs, span)
        self.proposed = 0  # engine-wide totals (metrics)
        self.accepted = 0
        self.reset()

    def reset(self) -> None:
        """Forget what was measured (the replica's warm-up guesses on made-up prompts say nothing of traffic)."""
        self._successes, self._trials = 1.0, 2.0  # the engine's recent rate starts at 1/2
        self.proposed = self.accepted = 0
        self.verifications = self.misses = 0  # steps that verified guesses; of those, ones that rejected one

    def observe_step(self, seqs: int, span: int, guessed: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of `seqs` sequences delivered `tokens` in `seconds`, with or without guesses."""
        key = (seqs, span, guessed)
        rate = tokens / max(seconds, 1e-9)
        old = self._delivered.get(key)
        self._delivered[key] = rate if old is None else old + 0.2 * (rate - old)

    def delivering(self, seqs: int, span: int) -> bool:
        """False while guessing has delivered fewer tokens per second than not guessing, at this size."""
        on, off = self._delivered.get((seqs, span, True)), self._delivered.get((seqs, span, False))
        if on is None or off is None or on >= off:
            return True
        held = self._held_back.get((seqs, span), 0) + 1
        self._held_back[(seqs, span)] = held % self.probe_every
        return held % self.probe_every == 0  # the probe

    @property
    def rate(self) -> float:
        return self._successes / self._trials

    def acceptance(self, seq: Sequence) -> float:
        a = (seq.spec_successes + self.prior_weight * self.rate) / (seq.spec_trials + self.prior_weight)
        return min(a, 0.99)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        self.proposed += proposed
        self.accepted += accepted
        self.verifications += 1
        self.misses += accepted < proposed
        trials = accepted + (accepted < proposed)
        seq.spec_successes = 0.7 * seq.spec_successes + accepted
        seq.spec_trials = 0.7 * seq.spec_trials + trials
        self._successes = 0.95 * self._successes + accepted
        self._trials = 0.95 * self._trials + trials

    def plan(
        self,
        seqs: list[Sequence],
        limits: list[int],
        proposer_cost: Callable[[list[int]], float],
        other_rows: int = 0,
        span: int = 1,
    ) -> list[int]:
        """Guesses per sequence (at most limits[i]) that maximise the step's expected tokens per second;
        `other_rows`: prompt tokens sharing the step (costed as rows)."""
        if self.always:
            return [min(limit, self.max_tokens) for limit in limits]
        ks = [0] * len(seqs)
        if not seqs or self.max_tokens < 1 or not self.step_cost.known or not self.delivering(len(seqs), span):
            return ks
        rates = [self.acceptance(s) for s in seqs]
        for seq in seqs:  # forget a little each step: a sequence that stopped guessing drifts back to the rate
            seq.spec_successes *= 0.9
            seq.spec_trials *= 0.9
        caps = [min(limit, self.max_tokens) for limit in limits]
        n, rows, tokens = len(seqs), len(seqs) + other_rows, float(len(seqs))
        best_rate, best = tokens / (self.step_cost(n, rows, span) + proposer_cost(ks)), list(ks)
        # add guesses one at a time, each where it is most likely accepted, and keep the best point on that path:
        # costs are not convex (the first extra row costs most), so stopping at the first loss would be wrong
        while True:
            pick, gain = -1, 0.0
            for i, (k, a) in enumerate(zip(ks, rates, strict=True)):
                if k < caps[i] and a ** (k + 1) > gain:
                    pick, gain = i, a ** (k + 1)
            if pick < 0:
                return self._explore(best, rates, caps, (n, span))
            ks[pick] += 1
            rows, tokens = rows + 1, tokens + gain
            rate = tokens / (self.step_cost(n, rows, span) + proposer_cost(ks))
            if rate > best_rate:
                best_rate, best = rate, list(ks)

    def _explore(self, plan: list[int], rates: list[float], caps: list[int], size: tuple[int, int]) -> list[int]:
        if any(plan) or not any(caps):
            self._idle[size] = 0
            return plan
        idle = self._idle.get(size, 0) + 1
        self._idle[size] = idle % (2 * self.probe_every)
        if idle < 2 * self.probe_every:
            return plan
        pick = max((i for i, cap in enumerate(caps) if cap > 0), key=lambda i: rates[i])
        plan[pick] = min(2, caps[pick])
        return plan

    @staticmethod
    def expected_speedup(a: float, k: int, c: float) -> float:
        """(1 - a^(k+1)) / ((1 - a)(k c + 1)): tokens per unit of time against plain decoding, for acceptance a,
        k guesses and c the cost of one guess relative to one target step (Leviathan et al. 2023)."""
        if a >= 1.0:
            return (k + 1) / (k * c + 1)
        return (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
