"""Token sampling as a pure function of logits and parameters.

For a row with temperature T, top-k K and top-p P: p = softmax(logits / T); keep the K most likely tokens;
keep the smallest set of the most likely tokens whose mass reaches P; renormalise; draw one with the row's
own generator, so a seeded request gives the same tokens whatever else is in the batch. T = 0 is argmax.
`probabilities` is that distribution (speculative decoding's verification compares it with the proposer's).
"""

from __future__ import annotations

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
