"""How long a new request would wait for its first token on this replica: the figure the gateway refuses new work
on (429 overloaded) when every replica's is past the first-token deadline.

    wait = prompt tokens still to prefill ahead of it / measured prefill rate
         + (when every batch slot is taken) requests ahead of it for a slot / measured finish rate

Both rates are measured on this replica's own live requests (an exponential average of prefill tokens per second;
finishes per second over the last FINISHES). Until a rate is measured its term counts as 0: the estimate never
refuses work on a guess.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

FINISHES = 32  # finish times kept for the finish rate
RATE_WINDOW_S = 60.0  # finishes older than this say nothing about the rate now
ALPHA = 0.2  # weight of the newest prefill measurement


@dataclass(frozen=True)
class Queue:
    """The live (priority 0) work of the engine now."""

    pending_prefill_tokens: int  # prompt tokens not yet computed, of waiting and running sequences
    waiting: int  # sequences not yet running
    free_slots: int  # batch slots (--max-num-seqs) not taken


class LoadEstimator:
    def __init__(self) -> None:
        self.prefill_rate: float | None = None  # tokens per second
        self._finishes: deque[float] = deque(maxlen=FINISHES)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A live request's prompt: `tokens` computed (not from the prefix cache) in `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.prefill_rate = rate if self.prefill_rate is None else (1 - ALPHA) * self.prefill_rate + ALPHA * rate

    def finished(self, now: float | None = None) -> None:
        self._finishes.append(time.monotonic() if now is None else now)

    def finish_rate(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        recent = [t for t in self._finishes if now - t <= RATE_WINDOW_S]
        if len(recent) < 2:
            return None
        span = max(now - recent[0], recent[-1] - recent[0])
        return (len(recent) - 1) / span if span > 0 else None

    def wait_s(self, queue: Queue, now: float | None = None) -> float:
        wait = 0.0
        if self.prefill_rate:
            wait += queue.pending_prefill_tokens / self.prefill_rate
        ahead = queue.waiting + 1 - queue.free_slots  # requests (this one included) with no slot
        rate = self.finish_rate(now)
        if ahead > 0 and rate:
            wait += ahead / rate
        return wait
