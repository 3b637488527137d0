"""Token sampling as a pure function of logits and parameters.

For a row with temperature T, top-k K and top-p P: p = softmax(logits / T); keep the K most likely tokens;
keep the smallest set of the most likely tokens whose mass reaches P; renormalise; draw one with the row's
own generator, so a seeded request gives the same tokens whatever else is in the batch. T = 0 is argmax.
`probabilities` is that distribution. `verify` is speculative decoding's acceptance of a proposer's guesses
(speculative.py proposes them): greedy keeps a guess while it is the argmax, sampling accepts it with
probability min(1, p / q) and draws the first rejected one from the residual, so output is distributed as plain
sampling's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blink.engine.sequence import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] (float32) -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows are overwritten below
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = draw(probabilities(logits[i], p), generators[i])
    return out


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution a non-greedy row samples from, [V], summing to 1."""
    logits = (logits - logits.max()) / p.temperature  # softmax's own shift, first: no overflow at any temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        drop = before >= p.top_p
        drop[0] = False  # the most likely token always stays (a top_p below float32's range would drop it too)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token from `probs` [V] (need not be normalised)."""
    return int(torch.multinomial(probs, 1, generator=gen).item())


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [len(tokens), V]: the distributions they were drawn from; None: one-hot
    predicted: bool = False  # taken from the request's own prediction (Predicted Outputs), not a proposer

    def truncate(self, k: int) -> Proposal:
        return Proposal(self.tokens[:k], None if self.probs is None else self.probs[:k], self.predicted)


def verify(logits: torch.Tensor, proposal: Proposal, params: SamplingParams, gen: torch.Generator | None) -> list[int]:
    """logits [k + 1, V] of the target at the last token and each of the k guesses -> the tokens to emit: the
    kept guesses and one token from the target (1 to k + 1 tokens)."""
    guesses = proposal.tokens
    assert logits.shape[0] == len(guesses) + 1, "one row per guess, and one for the token before them"
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for guess, target in zip(guesses, best, strict=False):
            if guess != target:
                break
            out.append(guess)
        out.append(best[len(out)])
        return out
    out = []
    for i, guess in enumerate(guesses):
        p = probabilities(logits[i], params)
        q_guess = 1.0 if proposal.probs is None else float(proposal.probs[i, guess])
        u = float(torch.rand((), generator=gen))
        if q_guess > 0 and u * q_guess <= float(p[guess]):  # accept with probability min(1, p / q)
            out.append(guess)
            continue
        if proposal.probs is None:
            residual = p.clone()
            residual[guess] = 0.0
        else:
            residual = (p - proposal.probs[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere can only mean p == q (rounding): p itself
            residual = p
        out.append(draw(residual, gen))
        return out
    out.append(draw(probabilities(logits[len(guesses)], params), gen))
    return out
