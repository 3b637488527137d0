"""Who guesses, how many, and what was kept: the engine's speculative decoding, apart from its step.

    proposals = speculator.propose(batch, blocks, max_model_len)   # before the forward (None: nobody guesses)
    speculator.commit(seq, proposal, accepted)                     # after it, per sequence that guessed
    speculator.observe(batch, proposals, tokens, seconds)          # the step's delivered rate, for the policy

Guesses come from two places. A request may bring its own prediction of the answer (OpenAI's Predicted Outputs:
the file being edited, the previous draft): its guesses are the prediction's tokens that follow where the answer
has got to (`prediction_lookup`), up to `--prediction-tokens` per step. Where a request has no prediction, or the
answer has left it (an edit the prediction doesn't have), the configured proposer guesses (speculative.py:
prompt lookup or a draft model), up to `--speculative-tokens`. Either way the target model verifies every guess
(sampler.verify), so the output is what plain decoding gives (greedy: token for token), and the policy
(speculation.py) decides how many guesses each sequence gets from the measured acceptance and step costs.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from blink.config import EngineConfig
from blink.engine.attention import key_span
from blink.engine.kv_cache import BlockManager
from blink.engine.runner import ModelRunner
from blink.engine.sampler import Proposal
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
from blink.engine.speculation import AdaptiveSpeculation, StepCost, measure_step_cost
from blink.engine.speculative import Proposer


def prediction_lookup(
    output: list[int], prediction: list[int], hint: int, k: int, *, max_n: int = 8
) -> tuple[int, int]:
    """Where the answer so far (`output`) stands in `prediction`: (start, n) such that prediction[start:start + k]
    are the guesses, found by matching the last n tokens of `output` (n from max_n down to 2; 1 while the answer
    has one token), first at or after `hint` - n (the answer keeps following the prediction), else anywhere.
    (-1, 0): the answer's last tokens are not in the prediction."""
    if k < 1 or not output or not prediction:
        return -1, 0
    data = array("i", prediction).tobytes()
    size = 4
    for n in range(min(max_n, len(output)), 0 if len(output) == 1 else 1, -1):
        pattern = array("i", output[-n:]).tobytes()
        for start in (max(0, hint - n) * size, 0):
            at = data.find(pattern, start)
            while at >= 0 and at % size:  # an unaligned hit: look further right
                at = data.find(pattern, at + 1)
            if at >= 0 and at // size + n < len(prediction):
                return at // size + n, n
    return -1, 0


TRUSTED_MATCH = 4  # answer tokens the prediction must match before its guesses replace the proposer's


class Speculator:
    def __init__(self, proposer: Proposer | None, config: EngineConfig) -> None:
        self.proposer = proposer
        self.proposer_tokens = config.speculative_tokens if proposer else 0
        self.prediction_tokens = config.prediction_tokens
        self.step_cost = StepCost()
        self.policy = AdaptiveSpeculation(
            max(self.proposer_tokens, self.prediction_tokens),
            self.step_cost,
            always=config.speculative_policy == "always",
        )

    def propose(self, batch: ScheduledBatch, blocks: BlockManager, max_model_len: int) -> list[Proposal | None] | None:
        """Guesses for the batch's decoding sequences, as many as the policy finds worth their rows, with the
        blocks to verify them (a sequence that would need another's blocks just doesn't guess this step)."""
        picked = [
            i
            for i, (seq, n) in enumerate(zip(batch.sequences, batch.chunks, strict=True))
            if n == 1
            and seq.output_token_ids
            and not seq.prefill_only
            and seq.num_computed + 1 == seq.num_tokens
            and (self.proposer_tokens or seq.prediction)
        ]
        if not picked:
            return None
        seqs = [batch.sequences[i] for i in picked]
        # no guess past max_tokens or the context: the last emitted token comes from the target
        room = [min(s.max_tokens - len(s.output_token_ids), max_model_len - s.num_tokens) - 1 for s in seqs]
        predicted = [self._from_prediction(s, r) for s, r in zip(seqs, room, strict=True)]
        limits = [0 if p else max(0, min(self.proposer_tokens, r)) for p, r in zip(predicted, room, strict=True)]
        prompt_rows = batch.num_tokens - len(seqs)  # prompt chunks sharing the step
        span = max(key_span(s.num_tokens) for s in seqs)
        if self.proposer is None or self.proposer.proposes_first:
            found = self._propose_others(seqs, predicted, limits)
            ks = self.policy.plan(seqs, [len(p.tokens) for p in found], self._cost(predicted), prompt_rows, span)
            chosen = [p.truncate(k) for p, k in zip(found, ks, strict=True)]
        else:
            wanted = [len(p.tokens) if p else k for p, k in zip(predicted, limits, strict=True)]
            ks = self.policy.plan(seqs, wanted, self._cost(predicted), prompt_rows, span)
            drafted = self._propose_others(seqs, predicted, [0 if p else k for p, k in zip(predicted, ks, strict=True)])
            chosen = [(p or d).truncate(k) for p, d, k in zip(predicted, drafted, ks, strict=True)]
        proposals: list[Proposal | None] = [None] * len(batch.sequences)
        for i, seq, proposal in zip(picked, seqs, chosen, strict=True):
            if proposal.tokens and blocks.allocate(seq.request_id, seq.num_tokens + len(proposal.tokens)):
                proposals[i] = proposal
        return proposals if any(proposals) else None

    def _from_prediction(self, seq: Sequence, room: int) -> Proposal | None:
        """The prediction's guesses for `seq` (None: it has none, or the answer is not in it just now)."""
        if not seq.prediction:
            return None
        k = min(self.prediction_tokens, room)
        start, n = prediction_lookup(seq.output_token_ids, seq.prediction, seq.prediction_at, k)
        # a match of fewer tokens than prompt lookup's longest is as likely chance (code repeats its short
        # runs): the proposer's guesses are better then (an unrelated prediction must not cost what lookup gains)
        if start < 0 or n < min(TRUSTED_MATCH, len(seq.output_token_ids)):
            return None
        seq.prediction_at = start
        return Proposal(seq.prediction[start : start + k], predicted=True)

    def _propose_others(self, seqs: list[Sequence], predicted: list[Proposal | None], ks: list[int]) -> list[Proposal]:
        """The prediction's guesses where there are some, the proposer's (at most ks[i]) for the rest."""
        out: list[Proposal] = [p or Proposal() for p in predicted]
        rest = [i for i, (p, k) in enumerate(zip(predicted, ks, strict=True)) if p is None and k > 0]
        if rest and self.proposer is not None:
            found = self.proposer.propose([seqs[i] for i in rest], [ks[i] for i in rest])
            for i, proposal in zip(rest, found, strict=True):
                out[i] = proposal
        return out

    def _cost(self, predicted: list[Proposal | None]) -> Callable[[list[int]], float]:
        """The proposer's cost of a plan: only the sequences it guesses for (a prediction costs nothing)."""
        proposer = self.proposer
        if proposer is None:
            return lambda ks: 0.0
        return lambda ks: proposer.cost([0 if p else k for p, k in zip(predicted, ks, strict=True)])

    def commit(self, seq: Sequence, proposal: Proposal, accepted: int) -> None:
        """`accepted` of the proposal's guesses were kept."""
        self.policy.record(seq, len(proposal.tokens), accepted)
        if proposal.predicted:
            seq.prediction_accepted += accepted
            seq.prediction_rejected += len(proposal.tokens) - accepted
            seq.prediction_at += accepted

    def observe(
        self, batch: ScheduledBatch, proposals: list[Proposal | None] | None, tokens: list[list[int]], seconds: float
    ) -> None:
        """A decode-only step ran: its cost for its size, and what it delivered with or without guesses."""
        guesses = [len(p.tokens) if p else 0 for p in proposals] if proposals else [0] * len(batch.sequences)
        span = max(key_span(s.num_computed + 1 + k) for s, k in zip(batch.sequences, guesses, strict=True))
        seqs = len(batch.sequences)
        self.step_cost.observe(seqs, seqs + sum(guesses), seconds, span)
        delivered = sum(len(t) for t in tokens)
        planned_span = max(key_span(s.num_tokens) for s in batch.sequences)  # as `propose` saw it
        self.policy.observe_step(seqs, planned_span, any(guesses), delivered, seconds)

    def measure(self, runner: ModelRunner, blocks: BlockManager, max_num_seqs: int, max_model_len: int) -> None:
        """Time decode-only forwards on this machine for the policy (speculation.measure_step_cost), and the
        proposer's own steps; on an idle engine."""
        measure_step_cost(
            runner,
            blocks,
            self.step_cost,
            self.proposer_tokens,
            max_num_seqs,
            max_model_len,
            one_seq_guesses=self.prediction_tokens,
        )
        if self.proposer is not None:
            most = max_num_seqs
            self.proposer.measure(sorted({1, max(1, most // 4), most}), min(100, max_model_len // 2))

    def remove(self, request_id: str) -> None:
        if self.proposer is not None:
            self.proposer.remove(request_id)
