from __future__ import annotations

import pytest

from blink.engine.kv_cache import SlotManager
from blink.engine.scheduler import Scheduler
from blink.engine.sequence import FinishReason, SamplingParams, SeqStatus, Sequence


def seq(rid: str, n: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4, temperature=0))


def test_admits_while_slots_are_free_and_decodes_running() -> None:
    sched = Scheduler(SlotManager(2), max_prefill_tokens=100)
    for rid in "abc":
        sched.add(seq(rid))
    first = sched.schedule()
    assert [s.request_id for s in first.prefills] == ["a", "b"] and not first.decodes
    second = sched.schedule()
    assert not second.prefills and [s.request_id for s in second.decodes] == ["a", "b"]
    sched.finish(first.prefills[0], FinishReason.STOP)
    third = sched.schedule()
    assert [s.request_id for s in third.prefills] == ["c"]
    assert [s.request_id for s in third.decodes] == ["b"]


def test_prefill_budget_splits_admission_but_never_starves_a_long_prompt() -> None:
    sched = Scheduler(SlotManager(4), max_prefill_tokens=10)
    sched.add(seq("long", 50))
    sched.add(seq("short", 5))
    assert [s.request_id for s in sched.schedule().prefills] == ["long"]  # over budget, admitted alone
    assert [s.request_id for s in sched.schedule().prefills] == ["short"]


def test_finish_frees_the_slot_and_forbids_illegal_transitions() -> None:
    slots = SlotManager(1)
    sched = Scheduler(slots, max_prefill_tokens=100)
    s = seq("a")
    sched.add(s)
    sched.schedule()
    assert slots.num_free == 0
    sched.finish(s, FinishReason.ABORTED)
    assert slots.num_free == 1 and s.status is SeqStatus.FINISHED and s.slot is None
    with pytest.raises(RuntimeError):
        s.set_status(SeqStatus.RUNNING)


def test_waiting_sequence_can_be_finished_without_a_slot() -> None:
    slots = SlotManager(1)
    sched = Scheduler(slots, max_prefill_tokens=100)
    a, b = seq("a"), seq("b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(b, FinishReason.ABORTED)
    assert not sched.waiting and slots.num_free == 0
