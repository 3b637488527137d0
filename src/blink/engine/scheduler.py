"""Continuous batching policy. No torch: it decides who runs, the runner runs them.

Each step: every running sequence decodes one token, and waiting sequences are admitted (first come, first
served) while a KV slot is free and the step's prompt-token budget allows (one over-budget prompt is admitted
alone, so nothing starves).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from blink.engine.kv_cache import SlotManager
from blink.engine.sequence import FinishReason, SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes


class Scheduler:
    def __init__(self, slots: SlotManager, *, max_prefill_tokens: int) -> None:
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(decodes=list(self.running))
        budget = self.max_prefill_tokens
        while self.waiting and self.slots.can_allocate():
            seq = self.waiting[0]
            cost = len(seq.prompt_token_ids)
            if batch.prefills and cost > budget:
                break
            self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.set_status(SeqStatus.RUNNING)
            self.running.append(seq)
            batch.prefills.append(seq)
            budget -= cost
        return batch

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out of the engine and free its slot."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            assert seq.slot is not None
            self.slots.free(seq.slot)
            seq.slot = None
        seq.finish_reason = reason
        seq.set_status(SeqStatus.FINISHED)
