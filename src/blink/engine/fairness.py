"""Fair sharing of the batch between tenants. No torch: the scheduler asks, this answers.

A tenant's fair share is `max_num_seqs / T` batch slots, T the tenants with live (priority 0) work, running or
waiting. Requests without a tenant (None) are one tenant, so a single-tenant server schedules as before: priority,
then arrival. Three rules, each only about live work (background work is never favoured over live work):

1. Admission: among waiting live requests, the tenant with the fewest running sequences goes first (ties: arrival).
2. Preemption: a waiting tenant below its share that finds the batch full (slots or KV blocks) takes the slot of
   the latest sequence of the tenant holding the most, if that one holds at least two more than it. The margin
   makes every such move narrow the gap, so two tenants never take a slot back and forth (the sum of the squared
   counts falls with each move). The victim is recomputed later (the scheduler's recompute preemption).
3. First token: a prompt whose tenant has nothing else running, in a batch whose other live sequences all belong
   to tenants at or over their share (a tenant using all its concurrency limit, 8 of a 16-sequence batch against
   one other tenant, is a flood too), is prefilled with the step's whole budget instead of `prefill_chunk_tokens`
   chunks, and the step that admits it is its own (the other live sequences sit it out, unless it does not fit
   after all), so a flood of streams holds one request's first token back neither for many steps nor by the
   flood's own decode step. The flooding tenants pay for it, once per such prompt: one of their inter-token gaps
   grows by that prefill.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from blink.engine.sequence import Sequence


@dataclass(frozen=True)
class Shares:
    """A snapshot of who holds the batch. Take a new one after admitting or preempting."""

    counts: Counter[str | None]  # live running sequences per tenant
    tenants: int  # tenants with live work, running or waiting
    max_num_seqs: int

    @classmethod
    def of(cls, running: Iterable[Sequence], waiting: Iterable[Sequence], max_num_seqs: int) -> Shares:
        counts = Counter(s.tenant for s in running if s.priority == 0)
        tenants = set(counts) | {s.tenant for s in waiting if s.priority == 0}
        return cls(counts, max(1, len(tenants)), max_num_seqs)

    def below(self, tenant: str | None) -> bool:
        return self.counts[tenant] * self.tenants < self.max_num_seqs

    def over(self, tenant: str | None) -> bool:
        return self.counts[tenant] * self.tenants > self.max_num_seqs

    def rank(self, seq: Sequence) -> tuple[int, int, float]:
        """Admission goes from the smallest rank up, preemption from the largest down: priority, then the
        running sequences of its tenant (live work only), then arrival."""
        return (seq.priority, self.counts[seq.tenant] if seq.priority == 0 else 0, seq.arrival)

    def victim(self, seq: Sequence, running: list[Sequence]) -> Sequence | None:
        """The running sequence whose slot (and blocks) waiting live `seq` may take (rule 2), or None."""
        if seq.priority > 0 or not self.below(seq.tenant):
            return None
        live = [s for s in running if s.priority == 0]
        if not live:
            return None
        richest = max(live, key=self.rank)  # the most sequences, then the latest to arrive
        return richest if self.counts[richest.tenant] >= self.counts[seq.tenant] + 2 else None

    def boosted(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Rule 3: `seq`'s prompt may take the whole step budget."""
        if seq.priority > 0:
            return False
        others = [s for s in running if s.priority == 0 and s is not seq]
        return bool(others) and all(s.tenant != seq.tenant and not self.below(s.tenant) for s in others)
