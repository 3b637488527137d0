"""Continuous batching with chunked prefill. No torch: it decides who runs how many tokens, the runner runs them.

Each step has a token budget. Running sequences go first, by priority then arrival: a decoding sequence takes one
token, one still prefilling takes the next chunk of its prompt. Then waiting sequences are admitted in the same
order, each starting after the longest cached prefix of its tokens (`BlockManager.lookup`), while the budget, the
batch size and the KV blocks allow. While any sequence is decoding, prompt chunks share a smaller budget
(`prefill_chunk_tokens`), so a long prompt arriving mid-stream delays the others' next token by one small chunk.
A chunk's cost grows with the context it attends to, so that budget counts each prompt token as
1 + context / `PREFILL_ATTENTION_TOKENS` tokens: deep into a long prompt, chunks get smaller, and a step stays about
as long as the first chunk's (measured: 32-token chunks at 1,000 tokens of context took 2x the step time of chunks
at the start, which broke the inter-token latency target).

Background work (priority above 0: pre-loading's prefill-only sequences) takes what live work leaves: while any
live sequence decodes, one background sequence per step gets at most `background_chunk_tokens` (so background
work barely touches live inter-token latency); otherwise background steps take `background_step_tokens` (so a live
request arriving waits one short step). A live request that finds the batch full preempts the latest background
sequence.

When blocks run out the lowest-priority, latest-arrived running sequence is preempted: its blocks are freed (the
registered ones stay in the prefix cache) and it waits to be recomputed, instead of the step failing. A sequence
whose deadline has passed is finished (EXPIRED) at the next step, waiting or running, and frees its blocks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from blink.engine.kv_cache import BlockManager
from blink.engine.sequence import FinishReason, SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    """`chunks[i]` tokens of `sequences[i]` go through the model, starting at its `num_computed`."""

    sequences: list[Sequence] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    expired: list[Sequence] = field(default_factory=list)  # finished by this step's schedule
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.sequences

    @property
    def num_tokens(self) -> int:
        return sum(self.chunks)

    def add(self, seq: Sequence, n: int) -> None:
        self.sequences.append(seq)
        self.chunks.append(n)


# context length at which attending costs a prompt token as much again as its weights (SmolLM2-135M on CPU:
# ~1.3 ms of attention vs ~1.2 ms of linear layers per token at 1,000 tokens of context)
PREFILL_ATTENTION_TOKENS = 512


def chunk_for(budget: int, start: int) -> tuple[int, int]:
    """The prompt tokens a chunk starting at position `start` may take from a prefill `budget`, and their cost."""
    n = max(1, round(budget / (1 + start / PREFILL_ATTENTION_TOKENS)))
    return n, chunk_cost(n, start)


def chunk_cost(n: int, start: int) -> int:
    """What `n` prompt tokens from position `start` count against a prefill budget (see the module docstring)."""
    return max(n, round(n * (1 + start / PREFILL_ATTENTION_TOKENS)))


def _order(seq: Sequence) -> tuple[int, float]:
    return (seq.priority, seq.arrival)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_tokens: int,
        background_chunk_tokens: int = 4,
        background_step_tokens: int = 32,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or prefill_chunk_tokens < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and prefill_chunk_tokens must be positive")
        if background_chunk_tokens < 0:
            raise ValueError("background_chunk_tokens must not be negative")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.background_chunk_tokens = background_chunk_tokens
        self.background_step_tokens = background_step_tokens
        self.background_tokens_used = 0  # prompt tokens of live requests found in blocks background work computed
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []  # sorted by (priority, arrival)

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        for seq in [s for s in self.waiting + self.running if s.expired(now)]:
            self.finish(seq, FinishReason.EXPIRED)
            batch.expired.append(seq)

        self._make_room_for_live()
        budget = self.max_num_batched_tokens
        decoding = any(s.num_computed >= s.num_tokens - 1 for s in self.running)
        live_decoding = any(s.priority == 0 and s.num_computed >= s.num_tokens - 1 for s in self.running)
        prefill_budget = self.prefill_chunk_tokens if decoding else budget
        background_budget = self.background_chunk_tokens if live_decoding else self.background_step_tokens
        # each prompt chunk costs a context gather and an attention call per layer besides its tokens: while live
        # streams decode, one background sequence per step
        background_seqs = 1 if live_decoding else self.max_num_seqs
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            remaining = seq.num_tokens - seq.num_computed
            n, cost = 1, 1
            if remaining > 1:
                allowed = prefill_budget if seq.priority == 0 else min(prefill_budget, background_budget)
                if allowed < 1 or (seq.priority > 0 and background_seqs < 1):
                    continue
                n, cost = self._chunk(
                    min(remaining, budget), allowed, seq.num_computed, decoding, self.blocks.block_size
                )
            if n < 1 or n > budget:
                continue
            if not self._allocate_preempting(seq, seq.num_computed + n, batch):
                continue
            batch.add(seq, n)
            budget -= n
            if remaining > 1:
                prefill_budget -= cost
                if seq.priority > 0:
                    background_budget -= cost
                    background_seqs -= 1

        while self.waiting and not batch.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            allowed = min(budget, prefill_budget if seq.priority == 0 else min(prefill_budget, background_budget))
            if allowed < 1 or (seq.priority > 0 and background_seqs < 1):
                break
            tokens = seq.token_ids
            prefix = self.blocks.lookup(tokens)
            cached = len(prefix) * self.blocks.block_size
            n, cost = self._chunk(min(len(tokens) - cached, budget), allowed, cached, decoding, self.blocks.block_size)
            if not self.blocks.allocate(seq.request_id, cached + n, prefix):
                break
            self.waiting.pop(0)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            if seq.priority == 0:
                self.background_tokens_used += self.blocks.claim(prefix) * self.blocks.block_size
            seq.num_computed = cached
            seq.set_status(SeqStatus.RUNNING)
            bisect.insort(self.running, seq, key=_order)
            batch.add(seq, n)
            budget -= n
            prefill_budget -= cost
            if seq.priority > 0:
                background_budget -= cost
                background_seqs -= 1
        return batch

    def _make_room_for_live(self) -> None:
        """Live requests waiting for a slot of a full batch take the slots of background sequences (latest
        first); the preempted ones wait, their computed blocks stay in the prefix cache."""
        live_waiting = sum(1 for s in self.waiting if s.priority == 0)
        short = live_waiting - (self.max_num_seqs - len(self.running))
        for victim in [s for s in reversed(self.running) if s.priority > 0][: max(0, short)]:
            self._preempt(victim)

    @staticmethod
    def _chunk(limit: int, prefill_budget: int, start: int, decoding: bool, block_size: int) -> tuple[int, int]:
        """(tokens, cost) of the next prompt chunk: at most `limit` tokens; while streams decode, weighted by
        the context it attends to (see chunk_for), and within one KV block: the runner attends a chunk block by
        block, each block one attention call over the whole context, whatever its number of tokens."""
        if not decoding:
            n = min(limit, prefill_budget)
            return n, n
        n, cost = chunk_for(prefill_budget, start)
        if n > block_size - start % block_size:
            n = block_size - start % block_size
            cost = chunk_cost(n, start)
        if n > limit:
            return limit, max(limit, round(limit * cost / n))
        return n, cost

    def _allocate_preempting(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for `seq` up to `num_tokens`, preempting lower-ranked running sequences (or `seq` itself, when
        it is the lowest) until they fit. False if `seq` itself was preempted."""
        while not self.blocks.allocate(seq.request_id, num_tokens):
            victim = self.running[-1]
            if victim in batch.sequences:  # already scheduled this step: never take blocks from under it
                victim = seq
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.set_status(SeqStatus.WAITING)
        bisect.insort(self.waiting, seq, key=_order)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out of the engine and free its blocks."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.finish_reason = reason
        seq.set_status(SeqStatus.FINISHED)
