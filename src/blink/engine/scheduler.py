"""Continuous batching with chunked prefill. No torch: it decides who runs how many tokens, the runner runs them.

Each step has a token budget. Running sequences go first, by priority then arrival: a decoding sequence takes one
token, one still prefilling takes the next chunk of its prompt. Then waiting sequences are admitted, by priority,
then the tenant with the fewest running sequences, then arrival (fairness.py, which also lets a tenant below its
share of the batch take a slot from the tenant holding the most), each starting after the longest cached prefix of
its tokens in its tenant's partition (`BlockManager.lookup`), while the budget, the batch size and the KV blocks
allow. While any sequence is decoding, prompt chunks share a smaller budget
(`prefill_chunk_tokens`), so a long prompt arriving mid-stream delays the others' next token by one small chunk.
Except in a burst: when live prompts still waiting for their first token outnumber the live streams that had
their first token before the oldest of them arrived (8 users arriving together, the first of them already
decoding), prompt chunks get the whole step budget, as with nobody decoding. Small chunks would hold the many first
tokens back for many steps (at 16 tokens a step, seven 101-token prompts take 45 steps) to spare the few streams one
long gap. A stream whose first token came after the burst arrived (one of the burst, or one that jumped ahead of
it) does not count, so a burst larger than one step's budget, or one whose last members arrive a step late (the
gateway admits requests one by one), keeps the whole budget to its end. A stream of a tenant with no
prompt in the burst vetoes it: one tenant's burst never lengthens another's inter-token gaps (a tenant sending a
burst each step would otherwise stall everyone else's streams every step).
A chunk's cost grows with the context it attends to, so that budget counts each prompt token as
1 + context / `PREFILL_ATTENTION_TOKENS` tokens: deep into a long prompt, chunks get smaller, and a step stays about
as long as the first chunk's (measured: 32-token chunks at 1,000 tokens of context took 2x the step time of chunks
at the start, which broke the inter-token latency target).

Background work (priority above 0: pre-loading's prefill-only sequences, pre-decodes) takes what live work
leaves. While any live sequence decodes, background prompt chunks go into one step in `background_period` (its
"turn"), which takes up to `background_step_tokens` of them, whole, as with nobody decoding; the other steps
carry none. Why not a small chunk every step: any prompt chunk takes the step off the fused decode path
(fused_decode.py), and measured on 2 cores such a step cost 2x a decode-only one (8 streams: 12.9 -> 25.6 ms
with a 4-token chunk), whatever the chunk's size: every step 2x slower doubled live streams' p99 inter-token
latency, while one slow step in 128 leaves the p99 alone and still prefills ~96 tokens per 1.7 s, more than eight
typists produce. A pre-decode's decode rows stay on the fused path, but each costs the step as much as another
stream: while live streams decode, one joins one step in PREDECODE_ROW_EVERY.
With no live stream decoding, background steps take `background_step_tokens` (so a live request arriving waits
one short step). A live request that finds the batch full preempts the latest background sequence.

Pre-decode (priority above 0, `park_after` tokens): decoding the first tokens of an answer before it is asked
for. Its decode rows are background work too (while live streams decode, they take the one background place of a
step). Having its tokens it is parked: it keeps its KV blocks but runs no steps, until `adopt` makes it a live
request (the submit matched it: it goes on decoding from there) or it ends: abandoned, its deadline passed, or
evicted (oldest first) when blocks run short, before any running sequence is preempted. `parked_lock` guards the
parked list: `reserve` (from any thread) keeps a parked sequence from expiring or being evicted while it is
being adopted.

When blocks run out a running sequence is preempted, instead of the step failing: the lowest-priority one, then the
one whose tenant holds the most sequences, then the latest to arrive. Preemption is by recompute (as vLLM's): its
blocks are freed (the registered ones stay in the prefix cache) and it waits, ahead of its tenant's later requests,
with its prompt and the tokens generated so far; re-admitted, it computes them again (the runner takes its output
tokens as decode rows, as they were first computed: bit for bit the same K/V) and samples its next token (its
sampling generator lives in the runner and goes on where it was), so nothing is emitted twice and greedy output
is what it would have been. A sequence
whose deadline has passed is finished (EXPIRED) at the next step, waiting or running, and frees its blocks.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from blink.engine.fairness import Shares
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

    def remove(self, seq: Sequence) -> int:
        """Take `seq` out of the step (it is being preempted); returns the tokens it had, 0 if it was not in."""
        for i, s in enumerate(self.sequences):
            if s is seq:
                del self.sequences[i]
                return self.chunks.pop(i)
        return 0


PREDECODE_ROW_EVERY = 4  # while live streams decode, a pre-decode's next token joins one step in this many

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


@dataclass
class _Budget:
    """What is left of one step's budgets (see the module docstring)."""

    tokens: int  # every token of the step: decodes and prompt chunks
    prefill: int  # prompt chunks' cost: small while anything decodes
    background: int  # background prompt chunks' cost
    background_seqs: int  # background sequences that may still take a chunk or a decode row
    decoding: bool  # some running sequence decodes: prompt chunks are weighted and kept within a block
    live_decoding: bool  # some live sequence decodes: background prompt chunks only in their turn
    turn: bool  # background prompt chunks' turn (see the module docstring)
    background_chunks: int = 0  # background prompt chunks placed

    @classmethod
    def start(cls, sched: Scheduler) -> _Budget:
        live_decoding = any(s.priority == 0 and s.num_computed >= s.num_tokens - 1 for s in sched.running)
        # a burst (see the module docstring): as with nobody decoding, prompt chunks take the whole budget; a
        # pre-decode decoding alone does not make live prompts wait in small chunks
        decoding = live_decoding and not _burst(sched)
        budget = sched.max_num_batched_tokens
        turn = not live_decoding or sched.since_background + 1 >= sched.background_period
        # off their turn, a pre-decode's decode row in one step of PREDECODE_ROW_EVERY: a row costs live streams
        # as much as one more stream (measured: 8 streams 13.9 -> 16.7 ms a step with one more row)
        row = sched.steps % sched.predecode_row_every == 0
        return cls(
            tokens=budget,
            prefill=sched.prefill_chunk_tokens if decoding else budget,
            background=sched.background_step_tokens if turn else 0,
            background_seqs=sched.max_num_seqs if turn else int(row),
            decoding=decoding,
            live_decoding=live_decoding,
            turn=turn,
        )

    def allowed(self, seq: Sequence, boosted: bool) -> int:
        """The cost `seq`'s next prompt chunk may have (below 1: none this step); `boosted`: fairness.py rule 3."""
        if boosted:
            return self.tokens
        if seq.priority == 0:
            return self.prefill
        return self.background if self.background_seqs > 0 else 0

    def chunked(self, seq: Sequence, boosted: bool) -> bool:
        """Whether `seq`'s prompt chunk is weighted and kept within a block: a background one in its turn is not
        (the step leaves the fused path anyway: what it carries costs little more)."""
        return self.decoding and not boosted and seq.priority == 0

    def charge(self, seq: Sequence, n: int, cost: int) -> None:
        """`n` tokens of `seq` joined the step; `cost`: of its prompt chunk, 0 for a decode."""
        self.tokens -= n
        if not cost and seq.priority > 0:  # a pre-decode's row
            self.background_seqs -= 1
        if cost:
            if seq.priority > 0:
                self.background -= cost
                self.background_seqs -= 1
                self.background_chunks += 1
            else:
                self.prefill -= cost


def _burst(sched: Scheduler) -> bool:
    """Live prompts waiting for their first token (admitted or not) outnumber the live streams that had their first
    token before the oldest of them arrived, and every such stream's tenant has a prompt among them (see the module
    docstring)."""
    prompts = [s for s in sched.waiting if s.priority == 0 and not s.output_token_ids]
    prompts += [
        s for s in sched.running if s.priority == 0 and s.num_computed < s.num_tokens - 1 and not s.output_token_ids
    ]
    if not prompts:
        return False
    since = min(s.arrival for s in prompts)
    streams = [
        s
        for s in sched.running
        if s.priority == 0
        and s.num_computed >= s.num_tokens - 1
        and s.first_token is not None
        and s.first_token <= since
    ]
    tenants = {s.tenant for s in prompts}
    return len(prompts) > len(streams) and all(s.tenant in tenants for s in streams)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_tokens: int,
        background_period: int = 128,
        background_step_tokens: int = 32,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or prefill_chunk_tokens < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and prefill_chunk_tokens must be positive")
        if background_period < 1:
            raise ValueError("background_period must be at least 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.background_period = background_period
        self.background_step_tokens = background_step_tokens
        self.since_background = 0  # steps with live streams decoding since background prompt chunks last ran
        self.steps = 0
        self.predecode_row_every = PREDECODE_ROW_EVERY
        self.background_tokens_used = 0  # prompt tokens of live requests found in blocks background work computed
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []  # sorted by (priority, arrival)
        self.parked: list[Sequence] = []  # pre-decodes holding their tokens, oldest first
        self.parked_lock = threading.RLock()

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        with self.parked_lock:  # one decision: a sequence reserved now is not expired
            expired = [s for s in self.parked if not s.reserved and s.expired(now)]
            for seq in expired:
                self.finish(seq, FinishReason.EXPIRED)
        for seq in [s for s in self.waiting + self.running if s.expired(now)]:
            self.finish(seq, FinishReason.EXPIRED)
            expired.append(seq)
        batch.expired += expired
        self._make_room_for_live()
        step = _Budget.start(self)
        sitting_out = self._sitting_out()
        self._continue_all(step, batch, sitting_out)
        if not batch.preempted:  # blocks ran short for the running ones: nobody new joins
            self._admit(step, batch)
        if sitting_out and all(s.tenant in sitting_out for s in batch.sequences if s.priority == 0):
            self._continue_all(step, batch, set())  # the newcomer did not fit after all: nobody sits out for nothing
        # a turn's steps count from the last one that carried background chunks (or had no live stream): work
        # arriving after a quiet while may take its turn at once
        self.since_background = 0 if step.background_chunks or not step.live_decoding else self.since_background + 1
        self.steps += 1
        return batch

    def _continue_all(self, step: _Budget, batch: ScheduledBatch, sitting_out: set[str | None]) -> None:
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or any(s is seq for s in batch.sequences):
                continue  # preempted earlier in this loop, or scheduled already
            if not (seq.priority == 0 and seq.tenant in sitting_out):
                self._continue(seq, step, batch)

    def _continue(self, seq: Sequence, step: _Budget, batch: ScheduledBatch) -> None:
        """Schedule a running sequence: its next token, or its prompt's next chunk."""
        remaining = seq.num_tokens - seq.num_computed
        n, cost = 1, 1
        if remaining <= 1 and seq.priority > 0 and step.background_seqs < 1:
            return  # a pre-decode's next token: only in a step's background place
        if remaining > 1:
            boosted = self._shares().boosted(seq, self.running)
            allowed = step.allowed(seq, boosted)
            if allowed < 1:
                return
            n, cost = self._chunk(min(remaining, step.tokens), allowed, seq.num_computed, step.chunked(seq, boosted))
        if n < 1 or n > step.tokens:
            return
        if self._allocate_preempting(seq, seq.num_computed + n, step, batch):
            batch.add(seq, n)
            step.charge(seq, n, cost if remaining > 1 else 0)

    def _admit(self, step: _Budget, batch: ScheduledBatch) -> None:
        """Admit waiting sequences, fairest first (fairness.py), while the budget, the slots and the blocks allow;
        a live one whose tenant is below its share may take a slot or blocks from the tenant holding the most."""
        while self.waiting:
            shares = self._shares()
            seq = min(self.waiting, key=shares.rank)
            if len(self.running) >= self.max_num_seqs:
                if not self._preempt_for_share(seq, shares, step, batch):
                    return
                continue
            boosted = shares.boosted(seq, self.running)
            allowed = min(step.tokens, step.allowed(seq, boosted))
            if allowed < 1:
                return
            tokens = seq.token_ids
            prefix = self.blocks.lookup(tokens, seq.salt)
            cached = len(prefix) * self.blocks.block_size
            n, cost = self._chunk(min(len(tokens) - cached, step.tokens), allowed, cached, step.chunked(seq, boosted))
            if not self.blocks.allocate(seq.request_id, cached + n, prefix, seq.salt):
                if self._evict_parked(batch):
                    continue
                if not self._preempt_for_share(seq, shares, step, batch):
                    return
                continue
            self.waiting.remove(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            if seq.priority == 0:
                self.background_tokens_used += self.blocks.claim(prefix) * self.blocks.block_size
            seq.num_computed = cached
            seq.set_status(SeqStatus.RUNNING)
            bisect.insort(self.running, seq, key=_order)
            batch.add(seq, n)
            step.charge(seq, n, cost)

    def _sitting_out(self) -> set[str | None]:
        """The tenants whose live sequences sit this step out (fairness.py, rule 3): all of them, when the next
        live request to admit will be prefilled whole and has a slot (free, or one its tenant may take)."""
        shares = self._shares()
        live = [s for s in self.waiting if s.priority == 0]
        seq = min(live, key=shares.rank) if live else None
        if seq is None or not shares.boosted(seq, self.running):
            return set()
        if len(self.running) >= self.max_num_seqs and shares.victim(seq, self.running) is None:
            return set()
        return {s.tenant for s in self.running if s.priority == 0}

    def _shares(self) -> Shares:
        return Shares.of(self.running, self.waiting, self.max_num_seqs)

    def _preempt_for_share(self, seq: Sequence, shares: Shares, step: _Budget, batch: ScheduledBatch) -> bool:
        """Free a slot and its blocks for waiting `seq` from the tenant holding the most (fairness.py, rule 2),
        taking the victim out of this step's batch if it was in. False if `seq`'s tenant has no claim."""
        victim = shares.victim(seq, self.running)
        if victim is None:
            return False
        step.tokens += batch.remove(victim)
        self._preempt(victim)
        batch.preempted.append(victim)
        return True

    def _make_room_for_live(self) -> None:
        """Live requests waiting for a slot of a full batch take the slots of background sequences (latest
        first); the preempted ones wait, their computed blocks stay in the prefix cache."""
        live_waiting = sum(1 for s in self.waiting if s.priority == 0)
        short = live_waiting - (self.max_num_seqs - len(self.running))
        for victim in [s for s in reversed(self.running) if s.priority > 0][: max(0, short)]:
            self._preempt(victim)

    def _chunk(self, limit: int, prefill_budget: int, start: int, decoding: bool) -> tuple[int, int]:
        """(tokens, cost) of the next prompt chunk: at most `limit` tokens; while streams decode, weighted by
        the context it attends to (see chunk_for), and within one KV block: the runner attends a chunk block by
        block, each block one attention call over the whole context, whatever its number of tokens."""
        if not decoding:
            n = min(limit, prefill_budget)
            return n, n
        block_size = self.blocks.block_size
        n, cost = chunk_for(prefill_budget, start)
        if n > block_size - start % block_size:
            n = block_size - start % block_size
            cost = chunk_cost(n, start)
        if n > limit:
            return limit, max(limit, round(limit * cost / n))
        return n, cost

    def _allocate_preempting(self, seq: Sequence, num_tokens: int, step: _Budget, batch: ScheduledBatch) -> bool:
        """Blocks for `seq` up to `num_tokens`, preempting running sequences until they fit: background work first,
        then the tenant holding the most, then the latest to arrive (fairness.py's rank). A victim already in this
        step's batch leaves it. False if `seq` itself ranked last and was preempted."""
        while not self.blocks.allocate(seq.request_id, num_tokens):
            if self._evict_parked(batch):
                continue
            victim = max(self.running, key=self._shares().rank)
            step.tokens += batch.remove(victim)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _evict_parked(self, batch: ScheduledBatch) -> bool:
        """Blocks ran short: end the oldest parked pre-decode not being adopted (it is reported as expired)."""
        with self.parked_lock:
            seq = next((s for s in self.parked if not s.reserved), None)
            if seq is None:
                return False
            self.finish(seq, FinishReason.EXPIRED)
        batch.expired.append(seq)
        return True

    def park(self, seq: Sequence) -> None:
        """A pre-decode has its tokens: it stops running and keeps its blocks (see the module docstring)."""
        if seq.status is not SeqStatus.RUNNING:
            return
        self.running.remove(seq)
        with self.parked_lock:
            seq.set_status(SeqStatus.PARKED)
            self.parked.append(seq)

    def reserve(self, seq: Sequence) -> bool:
        """Keep `seq` from expiring or being evicted while parked (any thread): False if it is not parked."""
        with self.parked_lock:
            if seq.status is not SeqStatus.PARKED:
                return False
            seq.reserved = True
            return True

    def adopt(self, seq: Sequence) -> None:
        """`seq` (a pre-decode, already given priority 0) is a live request now: parked, it runs again from its
        next token (a batch over its slots waits until one frees); waiting or running, it takes its new place."""
        if seq.status is SeqStatus.PARKED:
            with self.parked_lock:
                self.parked.remove(seq)
                seq.reserved = False
                seq.set_status(SeqStatus.RUNNING)
            bisect.insort(self.running, seq, key=_order)
            return
        queue = self.running if seq.status is SeqStatus.RUNNING else self.waiting
        queue.remove(seq)
        bisect.insort(queue, seq, key=_order)

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
        elif seq.status is SeqStatus.PARKED:
            with self.parked_lock:
                self.parked.remove(seq)
        self.blocks.free(seq.request_id)
        seq.finish_reason = reason
        seq.set_status(SeqStatus.FINISHED)
