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
its own paged KV cache). How many guesses each sequence gets in a step is the policy's (speculation.py).
"""

from __future__ import annotations

import dataclasses
import time
from array import array
from typing import Protocol

import torch

from blink.config import EngineConfig
from blink.engine.attention import PagedKVCache
from blink.engine.kv_cache import BlockManager
from blink.engine.runner import ModelRunner, kv_cache_dtype
from blink.engine.sampler import Proposal, draw, probabilities
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import SamplingParams, Sequence
from blink.engine.speculation import StepCost
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

        dtype = kv_cache_dtype(model, config.kv_cache_dtype)
        num_blocks = config.kv_cache_mb * 2**20 // PagedKVCache.bytes_per_block(model, config.block_size, dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=False)
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            native_kernels=config.native_kernels,
            kv_dtype=dtype,
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
