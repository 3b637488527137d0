"""The engine: synchronous, no I/O. The caller owns the thread.

    engine.add_request(request_id, prompt_token_ids, params, priority=0, deadline=None, prefill_only=False,
                       tenant=None)
    outputs = engine.step()      # schedule -> propose -> run -> commit: a token for each sequence that got one,
                                 # and a final output for each that expired
    engine.abort(request_id)     # frees the sequence (and its KV blocks) before the next step
    engine.adopt(request_id, max_tokens=None, deadline=None)  # a pre-decode becomes a live request

A pre-decode (`add_request(..., park_after=N)`, background priority) decodes its first N tokens, then parks
(scheduler.py): the caller holds those tokens, and `adopt` turns it into the live request that asked for the
same prompt and sampling, decoding on from its next token with its own sampling generator, so the output is the
one a cold run gives (greedy and seeded: the same tokens).

With a proposer (speculative decoding, see speculative.py), a step may emit several tokens of one sequence: one
StepOutput per token, in order.

Contract: all three are called from one thread at a time (the replica calls add/abort between steps).
`engine.interrupt_for(tenant)` is the exception: any thread may call it while a step runs (see its docstring).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from blink.config import EngineConfig, resolve_threads
from blink.engine.attention import PagedKVCache, StepInterrupted
from blink.engine.errors import ContextTooLong, RequestRejected
from blink.engine.kv_cache import BlockManager
from blink.engine.runner import ModelRunner, kv_cache_dtype
from blink.engine.sampler import Proposal
from blink.engine.scheduler import ScheduledBatch, Scheduler
from blink.engine.sequence import FinishReason, SamplingParams, SeqStatus, Sequence, StepOutput
from blink.engine.speculative import Proposer
from blink.engine.speculator import Speculator
from blink.models.llama import LlamaModel


@dataclass(frozen=True)
class _StepView:
    """Who holds the running step's batch, for `interrupt_for` on another thread (an immutable snapshot)."""

    counts: Counter[str | None]  # live running sequences per tenant
    tenants: frozenset[str | None]  # tenants with live work, running or waiting


class LLMEngine:
    def __init__(
        self,
        model: LlamaModel,
        stop_token_ids: frozenset[int],
        config: EngineConfig,
        *,
        proposer: Proposer | None = None,
        shared_prefixes: Iterable[list[int]] = (),
    ) -> None:
        """`shared_prefixes`: prompt beginnings (rendered system prompts) whose KV blocks every tenant may share
        (operator-declared; all other blocks are partitioned per tenant, see kv_cache.py)."""
        torch.set_num_threads(resolve_threads(config.threads))
        self.config = config
        self.max_model_len = min(config.max_model_len, model.positions)
        self.vocab_size = model.config.vocab_size
        self.stop_token_ids = stop_token_ids
        dtype = kv_cache_dtype(model, config.kv_cache_dtype)
        per_block = PagedKVCache.bytes_per_block(model, config.block_size, dtype)
        num_blocks = config.kv_cache_mb * 2**20 // per_block
        if num_blocks < -(-self.max_model_len // config.block_size):
            raise ValueError(
                f"--kv-cache-mb {config.kv_cache_mb} holds {num_blocks * config.block_size} tokens, less than one "
                f"sequence of --max-model-len {self.max_model_len}; raise it to at least "
                f"{-(-self.max_model_len // config.block_size) * per_block // 2**20 + 1}"
            )
        self.architecture = model.config.architecture
        self.weights_bytes = model.weight_bytes()
        self.kv_cache_bytes = num_blocks * per_block
        self.blocks = BlockManager(
            num_blocks, config.block_size, prefix_caching=config.prefix_caching, shared_prefixes=shared_prefixes
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
            background_period=config.background_period,
            background_step_tokens=config.background_step_tokens,
        )
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            native_kernels=config.native_kernels,
            kv_dtype=dtype,
        )
        self._seqs: dict[str, Sequence] = {}
        self.background_prefill_tokens = 0  # prompt tokens computed by background work (pre-loads, pre-decodes)
        self.interrupted_steps = 0  # steps called off for a newcomer (interrupt_for)
        self._view: _StepView | None = None  # set while an interruptible step runs
        self._last_interrupted = False
        # speculative decoding (a proposer's guesses, a request's prediction); the policy needs step costs
        self.speculator = Speculator(proposer, config)
        self.proposer, self.speculation, self.step_cost = proposer, self.speculator.policy, self.speculator.step_cost

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        deadline: float | None = None,
        prefill_only: bool = False,
        tenant: str | None = None,
        prediction: list[int] | None = None,
        park_after: int = 0,
    ) -> None:
        """Queue a request; it joins the running batch at the next step. Raises RequestRejected (engine/errors.py)
        for bad input, ContextTooLong when the prompt plus max_tokens (None: the rest of the context) won't fit.
        `priority`: lower runs first (0 for live requests; above 0 is background work, which gets only
        one step in `background_period` while live streams decode). `deadline`: a time.monotonic() after
        which the request is dropped (finish reason EXPIRED) instead of computed. `prefill_only`: compute the
        prompt's K/V into the prefix cache and finish (PREFILLED, no token): pre-loading. `tenant`: who it
        belongs to: it finds only its tenant's prefix-cache blocks (and declared shared prefixes), and the batch is
        shared fairly between tenants (fairness.py); None: an open server's single tenant. `prediction`: the
        tokens the answer is expected to copy (Predicted Outputs, speculator.py): verified as guesses, so the
        output is the same as without it. `park_after`: a pre-decode (see the module docstring)."""
        if request_id in self._seqs:
            raise RequestRejected(f"request {request_id!r} is already running")
        if not prompt_token_ids:
            raise RequestRejected("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise RequestRejected("prompt token id out of range", param="prompt")
        room = self.max_model_len - len(prompt_token_ids)
        if room <= 0 or (params.max_tokens or 0) > room:
            raise ContextTooLong(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            priority=priority,
            deadline=deadline,
            prefill_only=prefill_only,
            park_after=park_after,
            salt=self.blocks.salt(prompt_token_ids, tenant),
            max_tokens=params.max_tokens or room,
            # no answer is longer than the context: nor is a prediction it can follow
            prediction=[t for t in (prediction or [])[: self.max_model_len] if 0 <= t < self.vocab_size],
        )
        self._seqs[request_id] = seq
        self.runner.add(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Free the request's sequence now. Returns False if it is unknown (already finished)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORTED)
        return True

    def reserve(self, request_id: str) -> bool:
        """Any thread: keep a parked pre-decode from expiring or being evicted until `adopt` (False: it is not
        parked, or gone)."""
        seq = self._seqs.get(request_id)
        return seq is not None and self.scheduler.reserve(seq)

    def adopt(self, request_id: str, *, max_tokens: int | None, deadline: float | None) -> bool:
        """A live request asked for what pre-decode `request_id` computes (the same prompt and sampling): it runs
        on as that request, at priority 0, with `max_tokens` (None: the rest of the context) and `deadline`.
        False if it is gone, or has as many tokens as `max_tokens` allows (the caller runs the request anew)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is SeqStatus.FINISHED:
            return False
        room = self.max_model_len - len(seq.prompt_token_ids)
        limit = max_tokens or room
        if limit > room or len(seq.output_token_ids) >= limit:
            return False
        now = time.monotonic()
        seq.priority, seq.park_after, seq.deadline, seq.max_tokens = 0, 0, deadline, limit
        seq.arrival = now  # its queue and prefill, as the live request saw them: none (see StepOutput)
        if seq.first_scheduled is not None:
            seq.first_scheduled = now
        if seq.first_token is not None:
            seq.first_token = now
        self.scheduler.adopt(seq)
        bs = self.blocks.block_size
        prompt_blocks = self.blocks.table(request_id)[: len(seq.prompt_token_ids) // bs]
        self.scheduler.background_tokens_used += self.blocks.claim([self.blocks.blocks[b] for b in prompt_blocks]) * bs
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def interrupt_for(self, tenant: str | None) -> bool:
        """A live request of `tenant` has arrived while a step runs: call the step off (from any thread) when
        fairness.py's rule 3 will give that request a step of its own, that is when `tenant` has no live work in
        the engine and every tenant that has holds at least its share of the batch counting the newcomer's
        tenant (or the step is background work only). The step ends at its next layer among the first three
        quarters (runner.py) and is run again after the newcomer's; the flood pays for the part it had done.
        The step after a called-off one can't be called off, so a stream of newcomers costs the others at
        most half their steps. Returns whether the step was called off (False: none runs, or no claim)."""
        view = self._view
        if view is None or tenant in view.tenants:
            return False
        tenants = len(view.tenants) + 1
        if any(count * tenants < self.config.max_num_seqs for count in view.counts.values()):
            return False
        self.runner.interrupt.set()
        return True

    def _snapshot(self) -> _StepView:
        live = [s for s in self.scheduler.running if s.priority == 0]
        waiting = [s.tenant for s in self.scheduler.waiting if s.priority == 0]
        return _StepView(Counter(s.tenant for s in live), frozenset([*(s.tenant for s in live), *waiting]))

    def live_backlog(self) -> tuple[int, int, int]:
        """The live (priority 0) work ahead of a new request: (prompt tokens not yet computed, sequences waiting,
        batch slots free)."""
        live = [s for s in self.scheduler.waiting + self.scheduler.running if s.priority == 0]
        pending = sum(max(0, len(s.prompt_token_ids) - s.num_computed) for s in live)
        waiting = sum(1 for s in self.scheduler.waiting if s.priority == 0)
        return pending, waiting, max(0, self.config.max_num_seqs - len(self.scheduler.running))

    def cached_tokens(self, token_ids: list[int], tenant: str | None = None) -> int:
        """How many leading tokens of `token_ids` (whole blocks, all of them) a request of `tenant` starting with
        them would find in the prefix cache now."""
        salt = self.blocks.salt(token_ids, tenant)
        probe = [*token_ids, 0]  # lookup leaves a prompt's last token uncached: let that be one past them
        return len(self.blocks.lookup(probe, salt)) * self.blocks.block_size

    def num_tokens(self, request_id: str) -> tuple[int, int]:
        """(prompt, completion) tokens of a live request; (0, 0) once it is gone."""
        seq = self._seqs.get(request_id)
        return (len(seq.prompt_token_ids), len(seq.output_token_ids)) if seq else (0, 0)

    def step(self) -> list[StepOutput]:
        """Schedule -> propose -> run -> commit: one forward over the scheduled tokens."""
        now = time.monotonic()
        batch = self.scheduler.schedule(now)
        outputs = [self._expired(seq) for seq in batch.expired]
        if batch.empty:
            return outputs
        for seq in batch.sequences:
            seq.first_scheduled = seq.first_scheduled or now
        proposals = self.speculator.propose(batch, self.blocks, self.max_model_len)
        tokens = self._run(batch, proposals)
        if tokens is None:  # called off (interrupt_for): nothing moved
            return outputs
        for i, (seq, n, emitted) in enumerate(zip(batch.sequences, batch.chunks, tokens, strict=True)):
            outputs += self._commit(seq, n, emitted, proposals[i] if proposals else None)
        return outputs

    def _run(self, batch: ScheduledBatch, proposals: list[Proposal | None] | None) -> list[list[int]] | None:
        """The batch's forward and sampling (see runner.run); None if it was called off. Feeds the measured
        step time to the speculation policy."""
        tables = [self.blocks.table(seq.request_id) for seq in batch.sequences]
        started = time.perf_counter()
        interruptible = not self._last_interrupted
        if interruptible:
            self.runner.interrupt.clear()
            self._view = self._snapshot()
        try:
            tokens = self.runner.run(batch, tables, proposals, interruptible=interruptible)
        except StepInterrupted:
            self._called_off(batch, proposals)
            return None
        finally:
            self._view = None
        self._last_interrupted = False
        if all(n == 1 for n in batch.chunks):  # decode only: what the policy predicts
            self.speculator.observe(batch, proposals, tokens, time.perf_counter() - started)
        return tokens

    def _commit(self, seq: Sequence, n: int, emitted: list[int], proposal: Proposal | None) -> list[StepOutput]:
        """Advance `seq` by its `n` computed tokens (and its kept guesses), register the blocks that filled up,
        and turn its emitted tokens into outputs."""
        bs = self.blocks.block_size
        before = seq.num_computed
        # background work's prompt tokens (pre-loads, pre-decodes), and its blocks flagged until a live request
        # uses them (BlockManager.claim): the cost of working ahead, and how much of it paid
        background = seq.priority > 0 and before < len(seq.prompt_token_ids)
        if background:
            self.background_prefill_tokens += min(n, len(seq.prompt_token_ids) - before)
        if proposal and proposal.tokens:
            accepted = len(emitted) - 1  # the kept guesses; their K/V are computed, the rejected ones' are not
            self.speculator.commit(seq, proposal, accepted)
            n += accepted
        seq.num_computed += n
        if seq.num_computed // bs > before // bs:  # a block filled up: register it for prefix reuse, now,
            # before a token that ends the request frees its blocks (the emitted tokens' K/V come next step)
            known = min(seq.num_computed, seq.num_tokens)
            self.blocks.commit(seq.request_id, seq.token_ids, known, speculative=background)
        outputs = []
        for token in emitted:
            outputs.append(self._postprocess(seq, token))
            if outputs[-1].finished:  # a stop token or max_tokens inside the kept guesses: the rest is dropped
                return outputs
        if seq.num_computed // bs > before // bs:  # and the blocks of accepted guesses, now in token_ids
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_computed, speculative=background)
        if proposal and proposal.tokens:
            self.blocks.trim(seq.request_id, seq.num_computed)  # the rejected guesses' blocks
        if seq.prefill_only and seq.num_computed == seq.num_tokens:
            self._finish(seq, FinishReason.PREFILLED)
            outputs.append(self._output(seq, None, FinishReason.PREFILLED))
        return outputs

    def _called_off(self, batch: ScheduledBatch, proposals: list[Proposal | None] | None) -> None:
        """The step was interrupted: nothing moved (runner.py); give back the blocks its guesses took."""
        self.interrupted_steps += 1
        self._last_interrupted = True
        for seq, proposal in zip(batch.sequences, proposals or [], strict=False):
            if proposal and proposal.tokens:
                self.blocks.trim(seq.request_id, seq.num_computed + 1)

    def measure_step_cost(self) -> dict[str, float]:
        """Time decode-only forwards on this machine for the speculation policy (Speculator.measure); the replica
        calls this while warming up, on an idle engine. Returns {"<seqs>x<rows>@<keys>": seconds}."""
        if self.speculation.max_tokens < 1:
            return {}
        assert not self.has_work(), "measure on an idle engine"
        self.speculator.measure(self.runner, self.blocks, self.config.max_num_seqs, self.max_model_len)
        return self.step_cost.snapshot()

    def _expired(self, seq: Sequence) -> StepOutput:
        self._forget(seq.request_id)
        return self._output(seq, None, FinishReason.EXPIRED)

    def _output(self, seq: Sequence, token: int | None, reason: FinishReason | None) -> StepOutput:
        first_scheduled = seq.first_scheduled or time.monotonic()
        return StepOutput(
            request_id=seq.request_id,
            token_id=token,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            cached_tokens=seq.num_cached_tokens,
            queue_s=first_scheduled - seq.arrival,
            prefill_s=(seq.first_token - first_scheduled) if seq.first_token else 0.0,
            spec_proposed=seq.spec_proposed,
            spec_accepted=seq.spec_accepted,
            prediction_accepted=seq.prediction_accepted,
            prediction_rejected=seq.prediction_rejected,
        )

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.output_token_ids.append(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        reason = None
        if token in self.stop_token_ids and not seq.params.ignore_eos:
            reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
        elif seq.park_after and len(seq.output_token_ids) >= seq.park_after:
            self.scheduler.park(seq)
        return self._output(seq, token, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        self._forget(seq.request_id)

    def _forget(self, request_id: str) -> None:
        self.runner.remove(request_id)
        self.speculator.remove(request_id)
        del self._seqs[request_id]

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = "generate") -> list[int]:
        """Convenience for tests and warm-up: run one request to completion, return its output tokens."""
        self.add_request(request_id, prompt_token_ids, params)
        out: list[int] = []
        while True:
            for o in self.step():
                if o.request_id == request_id:
                    if o.token_id is not None:
                        out.append(o.token_id)
                    if o.finished:
                        return out
