"""Token sampling as a pure function of logits and parameters.

For a row with temperature T, top-k K and top-p P: p = softmax(logits / T); keep the K most likely tokens;
keep the smallest set of the most likely tokens whose mass reaches P; renormalise; draw one with the row's
own generator, so a seeded request gives the same tokens whatever else is in the batch. T = 0 is argmax.
`probabilities` is that distribution. `verify` is speculative decoding's acceptance of a proposer's guesses
(speculative.py proposes them): greedy keeps a guess while it is the argmax, sampling accepts it with
probability min(1, p / q) and draws the first rejected one from the residual, so output is distributed as plain
sampling's.

A seeded request (`seed` set) draws each token as a function of the distribution, the seed and the token's
position in the answer alone (`exact`: the exponential race argmax p / E, E drawn from a generator seeded with
seed and position): the same seed gives the same answer whatever else shares its steps, whether speculative
decoding guessed (a guess is kept exactly when it is the token plain sampling draws there: for a one-hot guess
that happens with probability p, as min(1, p / q) accepts it), whether it was preempted, or pre-decoded and
adopted (llm_engine.py). A draw from the request's own generator could not promise that: how many numbers a
verification takes from it depends on the guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blink.engine.sequence import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    positions: list[int] | None = None,
) -> list[int]:
    """logits [B, V] (float32) -> one token id per row; `positions`: each row's token's index in its answer (for
    seeded rows; 0 when not given)."""
    out = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows are overwritten below
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = probabilities(logits[i], p)
        out[i] = (
            draw(probs, generators[i]) if p.seed is None else exact(probs, p.seed, positions[i] if positions else 0)
        )
    return out


def exact(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token a seeded request draws at `position` of its answer from `probs` [V] (see the module docstring)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + position) % (1 << 63))
    race = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=gen)
    return int((probs / race).argmax())


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


def verify(
    logits: torch.Tensor, proposal: Proposal, params: SamplingParams, gen: torch.Generator | None, position: int = 0
) -> list[int]:
    """logits [k + 1, V] of the target at the last token and each of the k guesses -> the tokens to emit: the
    kept guesses and one token from the target (1 to k + 1 tokens). `position`: the first one's index in the
    answer (seeded requests)."""
    guesses = proposal.tokens
    assert logits.shape[0] == len(guesses) + 1, "one row per guess, and one for the token before them"
    if params.greedy or params.seed is not None:
        if params.greedy:
            best = logits.argmax(dim=-1).tolist()
        else:  # the token plain sampling draws at each position: a guess is kept when it is that one
            seed = params.seed
            assert seed is not None
            best = [exact(probabilities(logits[i], params), seed, position + i) for i in range(len(logits))]
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
