"""KV cache bookkeeping: which slot of the runner's cache a sequence owns. No torch here.

Each running sequence owns one slot of `max_model_len` positions. (Paged blocks with prefix sharing replace
this in the fast-engine work; the runner's attention only sees slot indices and lengths.)
"""

from __future__ import annotations


class SlotManager:
    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        assert self._free, "allocate() without can_allocate()"
        return self._free.pop()

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._free.append(slot)
