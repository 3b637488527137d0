"""The engine: synchronous, no I/O. The caller owns the thread.

    engine.add_request(request_id, prompt_token_ids, params)
    outputs = engine.step()      # schedule -> run -> postprocess; one new token per running sequence
    engine.abort(request_id)     # frees the sequence before the next step

Contract: all three are called from one thread at a time (the replica calls add/abort between steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blink.config import EngineConfig, resolve_threads
from blink.engine.kv_cache import SlotManager
from blink.engine.runner import ModelRunner
from blink.engine.scheduler import Scheduler
from blink.engine.sequence import FinishReason, SamplingParams, SeqStatus, Sequence
from blink.errors import ContextLengthExceeded, InvalidRequest
from blink.models.llama import LlamaModel


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    queue_s: float  # arrival -> first scheduled
    prefill_s: float  # first scheduled -> first token


class LLMEngine:
    def __init__(self, model: LlamaModel, stop_token_ids: frozenset[int], config: EngineConfig) -> None:
        torch.set_num_threads(resolve_threads(config.threads))
        self.config = config
        self.max_model_len = min(config.max_model_len, model.config.max_position_embeddings)
        self.vocab_size = model.config.vocab_size
        self.stop_token_ids = stop_token_ids
        self.scheduler = Scheduler(SlotManager(config.max_num_seqs), max_prefill_tokens=config.max_prefill_tokens)
        self.runner = ModelRunner(model, num_slots=config.max_num_seqs, max_len=self.max_model_len)
        self._seqs: dict[str, Sequence] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it joins the running batch at the next step. Raises InvalidRequest for bad input."""
        if request_id in self._seqs:
            raise InvalidRequest(f"request {request_id!r} is already running")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise InvalidRequest("prompt token id out of range", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}",
                param="messages",
            )
        seq = Sequence(request_id, list(prompt_token_ids), params)
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

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_tokens(self, request_id: str) -> tuple[int, int]:
        """(prompt, completion) tokens of a live request; (0, 0) once it is gone."""
        seq = self._seqs.get(request_id)
        return (len(seq.prompt_token_ids), len(seq.output_token_ids)) if seq else (0, 0)

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        now = time.monotonic()
        for seq in batch.prefills:
            seq.first_scheduled = seq.first_scheduled or now
        tokens = self.runner.run(batch)
        return [self._postprocess(seq, tok) for seq, tok in zip(batch.sequences, tokens, strict=True)]

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.output_token_ids.append(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        reason = None
        if token in self.stop_token_ids and not seq.params.ignore_eos:
            reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
        assert seq.first_scheduled is not None
        return StepOutput(
            request_id=seq.request_id,
            token_id=token,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            queue_s=seq.first_scheduled - seq.arrival,
            prefill_s=seq.first_token - seq.first_scheduled,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        self.runner.remove(seq.request_id)
        del self._seqs[seq.request_id]

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = "generate") -> list[int]:
        """Convenience for tests and warm-up: run one request to completion, return its output tokens."""
        self.add_request(request_id, prompt_token_ids, params)
        out: list[int] = []
        while True:
            for o in self.step():
                if o.request_id == request_id:
                    out.append(o.token_id)
                    if o.finished:
                        return out
