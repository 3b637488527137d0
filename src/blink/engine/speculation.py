"""The speculation policy: how many guesses each decoding sequence gets in a step (`AdaptiveSpeculation`), from
the measured acceptance rates and the measured cost of a step as a function of its rows (`StepCost`), which
`measure_step_cost` times on this machine while the replica warms up."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable

from blink.engine.attention import DECODE_KEY_QUANTUM
from blink.engine.kv_cache import BlockManager
from blink.engine.runner import ModelRunner
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import SamplingParams, Sequence


def measure_step_cost(
    runner: ModelRunner,
    blocks: BlockManager,
    cost: StepCost,
    max_guesses: int,
    max_seqs: int,
    max_model_len: int,
    *,
    one_seq_guesses: int = 0,
) -> None:
    """Time decode-only forwards over a grid of sequence counts, rows per sequence (1 to max_guesses + 1) and key
    spans into `cost` (real steps refine it); and one sequence with one_seq_guesses guesses (a prediction's:
    predictions come with single requests, many at once are rare). Only the sizes the KV pool holds: StepCost
    estimates the rest."""
    per_seq = max(max_guesses, one_seq_guesses) + 1
    most = max_seqs
    counts = sorted({1, max(1, most // 4), most})
    rows = sorted({1, 2, max_guesses + 1}) if max_guesses else [1, 2]
    sizes = sorted({(b, b * r, 1) for b in counts for r in rows} | {(1, one_seq_guesses + 1, 1)})
    if max_model_len > DECODE_KEY_QUANTUM + per_seq:  # and the next span, where attention costs more
        sizes += [(b, b * r, 2) for b in sorted({1, most}) for r in (1, 2)]

    def context(span: int) -> int:  # within the context the engine serves (its rotary tables cover no more)
        return max(1, min((span - 1) * DECODE_KEY_QUANTUM + 100, max_model_len - per_seq - 1))

    sizes = [
        (b, r, span) for b, r, span in sizes if b * blocks.blocks_for(context(span) + r // b) <= blocks.num_free_blocks
    ]

    def run(count: int, rows: int, span: int) -> None:
        length = context(span)
        seqs = [Sequence(f"measure-{j}", [0] * length, SamplingParams(), [0]) for j in range(count)]
        guesses = [[0] * (rows // count - 1)] * count
        try:
            for seq, g in zip(seqs, guesses, strict=True):
                seq.num_computed = length
                if not blocks.allocate(seq.request_id, length + 1 + len(g)):
                    raise RuntimeError("the KV pool is too small to measure step costs")
            tables = [blocks.table(s.request_id) for s in seqs]
            runner.forward(ScheduledBatch(seqs, [1] * count), tables, guesses)
        finally:
            for seq in seqs:
                blocks.free(seq.request_id)

    cost.measure(sizes, run)


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
