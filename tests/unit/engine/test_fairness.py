"""Fair sharing of the batch between tenants (engine/fairness.py), through the scheduler with a fake runner."""

from __future__ import annotations

import time

from blink.engine.kv_cache import BlockManager, CacheSalt
from blink.engine.scheduler import Scheduler
from blink.engine.sequence import SamplingParams, SeqStatus, Sequence
from tests.unit.engine.test_scheduler import BS, chunks, make, run

_clock = iter(range(1_000_000))


def seq(rid: str, tenant: str | None, n: int = 4, *, priority: int = 0) -> Sequence:
    """A request of `tenant` with its own tokens (no two share a prefix), arriving after every earlier one."""
    first = 1000 + next(_clock) * 100
    arrival = time.monotonic()  # comparable with a first token's time (the scheduler's bursts)
    tokens = list(range(first, first + n))
    params = SamplingParams(max_tokens=100, temperature=0)
    return Sequence(rid, tokens, params, priority=priority, salt=CacheSalt(tenant), arrival=arrival)


def running_ids(sched: Scheduler) -> set[str]:
    return {s.request_id for s in sched.running}


def flood(sched: Scheduler, tenant: str, count: int) -> list[Sequence]:
    """`count` requests of `tenant`, admitted and decoding."""
    seqs = [seq(f"{tenant}{i}", tenant) for i in range(count)]
    for s in seqs:
        sched.add(s)
    run(sched)
    assert all(s.status is SeqStatus.RUNNING for s in seqs)
    return seqs


def test_the_tenant_with_the_fewest_running_sequences_is_admitted_first() -> None:
    sched = make(seqs=5)  # a's 2 are below its share (2.5): no step of b0's own (rule 3)
    flood(sched, "a", 2)
    later = [seq("a2", "a"), seq("a3", "a"), seq("a4", "a"), seq("b0", "b")]
    for s in later:
        sched.add(s)
    batch = run(sched)
    # b0 came last but its tenant had nothing running; 4 first tokens waiting for 2 streams are a burst (whole
    # budget), so the 5 slots fill
    assert list(chunks(batch)) == ["a0", "a1", "b0", "a2", "a3"]
    assert [s.request_id for s in sched.waiting] == ["a4"]  # within a tenant: arrival order


def test_a_single_tenant_is_admitted_in_arrival_order_as_before() -> None:
    sched = make(seqs=2)
    for rid in ["x", "y", "z"]:
        sched.add(seq(rid, None))
    run(sched)
    assert running_ids(sched) == {"x", "y"}
    for _ in range(3):  # nobody takes a slot from its own tenant
        assert not run(sched).preempted


def test_a_tenant_with_nothing_running_takes_a_slot_from_the_tenant_holding_the_most() -> None:
    sched = make(seqs=4)
    a = flood(sched, "a", 4)
    for _ in range(3):
        run(sched)
    generated = list(a[3].output_token_ids)
    sched.add(seq("b0", "b"))
    batch = run(sched)
    assert batch.preempted == [a[3]]  # the latest of the tenant holding the most
    assert chunks(batch) == {"b0": 4}  # a step of its own (rule 3)
    # recompute preemption: its blocks are freed, it waits with its tokens so far and nothing is emitted again
    assert a[3].status is SeqStatus.WAITING and a[3].num_computed == 0 and sched.blocks.table("a3") == []
    assert a[3].output_token_ids == generated and a[3].token_ids == a[3].prompt_token_ids + generated
    for _ in range(3):  # a is at its share now (3 of 4 with 2 tenants is over it, but b has nothing waiting)
        assert not run(sched).preempted
    assert running_ids(sched) == {"a0", "a1", "a2", "b0"}


def test_slots_never_go_back_and_forth_between_two_tenants() -> None:
    sched = make(seqs=2)
    flood(sched, "a", 2)
    sched.add(seq("b0", "b"))
    sched.add(seq("b1", "b"))
    assert [s.request_id for s in run(sched).preempted] == ["a1"]
    for _ in range(4):  # one each: b1 (below its share no more) waits, as does a1
        assert not run(sched).preempted
        assert running_ids(sched) == {"a0", "b0"}


def test_with_one_slot_a_running_sequence_is_not_preempted_for_another_tenant() -> None:
    sched = make(seqs=1)
    flood(sched, "a", 1)
    sched.add(seq("b0", "b"))
    for _ in range(3):
        assert not run(sched).preempted
    assert running_ids(sched) == {"a0"}


def test_background_work_never_takes_a_slot_from_live_work() -> None:
    sched = make(seqs=2)
    flood(sched, "a", 2)
    sched.add(seq("pre", "b", priority=1))
    for _ in range(3):
        assert not run(sched).preempted
    assert running_ids(sched) == {"a0", "a1"}


def test_a_tenant_below_its_share_takes_kv_blocks_from_the_tenant_holding_the_most() -> None:
    sched = Scheduler(BlockManager(8, BS), max_num_seqs=8, max_num_batched_tokens=64, prefill_chunk_tokens=8)
    a = [seq(f"a{i}", "a", 7) for i in range(4)]  # 2 blocks each: every block of the pool
    for s in a:
        sched.add(s)
    run(sched)
    assert sched.blocks.num_free_blocks == 0
    sched.add(seq("b0", "b", 3))
    batch = run(sched)  # a's decodes fit their blocks; b0 needs one more than there is
    assert batch.preempted == [a[3]]
    assert chunks(batch) == {"b0": 3}  # and a, at its share, sits this step out (rule 3)
    assert chunks(run(sched)) == {"a0": 1, "a1": 1, "a2": 1, "b0": 1}


def test_the_prompt_of_a_tenant_with_nothing_running_skips_the_small_chunks_when_the_others_are_over_share() -> None:
    sched = make(seqs=4, budget=64, chunk=8)
    flood(sched, "a", 4)
    run(sched)
    sched.add(seq("b0", "b", 30))
    batch = run(sched)
    assert chunks(batch) == {"b0": 30}  # the whole prompt in one step of its own, not 4-token chunks
    assert chunks(run(sched)) == {"a0": 1, "a1": 1, "a2": 1, "b0": 1}  # and then everyone decodes again


def test_a_tenant_within_its_share_keeps_the_decoders_small_chunks() -> None:
    sched = make(seqs=8, budget=64, chunk=8)
    flood(sched, "a", 2)  # 2 of 8 slots, 2 tenants: within its share of 4
    run(sched)
    sched.add(seq("b0", "b", 30))
    assert chunks(run(sched))["b0"] <= BS


def test_nobody_sits_out_for_a_newcomer_that_does_not_fit() -> None:
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=2, max_num_batched_tokens=64, prefill_chunk_tokens=8)
    sched.add(seq("a0", "a", 7))
    run(sched)
    sched.add(seq("b0", "b", 20))  # 5 blocks: more than the pool; with c, a is over its share of 2 / 3
    sched.add(seq("c0", "c"))
    for _ in range(3):
        assert chunks(run(sched)) == {"a0": 1}  # a keeps decoding


def test_one_tenants_burst_never_stalls_another_tenants_stream() -> None:
    sched = make(seqs=8, budget=64, chunk=4)
    b = seq("b0", "b")
    sched.add(b)
    run(sched)  # b streams
    burst = [seq(f"a{i}", "a", 8) for i in range(4)]
    for s in burst:
        sched.add(s)
    batch = chunks(run(sched))
    assert batch["b0"] == 1 and sum(n for rid, n in batch.items() if rid != "b0") <= 4  # small chunks, not 32
    assert sum(chunks(run(sched)).values()) <= 5
