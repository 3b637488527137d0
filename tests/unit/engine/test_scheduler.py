"""The scheduler with a fake runner: budgets, chunked prefill, prefix hits, preemption, priorities, abort, deadlines."""

from __future__ import annotations

import time

import pytest

from blink.engine.kv_cache import BlockManager
from blink.engine.scheduler import PREFILL_ATTENTION_TOKENS, ScheduledBatch, Scheduler, chunk_for
from blink.engine.sequence import FinishReason, SamplingParams, SeqStatus, Sequence

BS = 4


def seq(rid: str, n: int = 4, *, priority: int = 0, first: int = 1, deadline: float | None = None) -> Sequence:
    tokens = list(range(first, first + n))
    return Sequence(rid, tokens, SamplingParams(max_tokens=100, temperature=0), priority=priority, deadline=deadline)


def make(blocks: int = 64, *, seqs: int = 8, budget: int = 64, chunk: int = 8) -> Scheduler:
    return Scheduler(
        BlockManager(blocks, BS), max_num_seqs=seqs, max_num_batched_tokens=budget, prefill_chunk_tokens=chunk
    )


def run(sched: Scheduler, now: float = 0.0) -> ScheduledBatch:
    """One step with a fake runner: the scheduled tokens become computed; a sequence whose chunk reached its
    end gets a new token (always 7)."""
    batch = sched.schedule(now)
    for s, n in zip(batch.sequences, batch.chunks, strict=True):
        assert s.status is SeqStatus.RUNNING
        assert len(sched.blocks.table(s.request_id)) * BS >= s.num_computed + n  # the runner has room
        s.num_computed += n
        sched.blocks.commit(s.request_id, s.token_ids, s.num_computed)
        if s.num_computed == s.num_tokens:
            s.output_token_ids.append(7)
            s.first_token = s.first_token or time.monotonic()
    return batch


def chunks(batch: ScheduledBatch) -> dict[str, int]:
    return {s.request_id: n for s, n in zip(batch.sequences, batch.chunks, strict=True)}


def test_running_sequences_decode_one_token_each_and_new_ones_join() -> None:
    sched = make()
    sched.add(seq("a"))
    assert chunks(run(sched)) == {"a": 4}
    sched.add(seq("b", 3))
    assert chunks(run(sched)) == {"a": 1, "b": 3}
    assert chunks(run(sched)) == {"a": 1, "b": 1}


def test_a_long_prompt_is_chunked_and_decoders_keep_their_token_every_step() -> None:
    sched = make(budget=64, chunk=8)
    sched.add(seq("a"))
    run(sched)
    sched.add(seq("long", 30, first=50))
    seen = []
    while "long" not in [s.request_id for s in sched.running] or sched.running[-1].num_computed < 30:
        c = chunks(run(sched))
        assert c["a"] == 1  # never stalled by the long prompt
        seen.append(c["long"])
    expected, start = [], 0
    while start < 30:  # each chunk as chunk_for sizes it at its start position, and within its KV block
        n = min(chunk_for(8, start)[0], BS - start % BS, 30 - start)
        expected.append(n)
        start += n
    assert seen == expected
    assert sum(seen) == 30 and all(n <= BS for n in seen)  # 8-token chunks would cross 4-token blocks


def test_chunks_shrink_as_the_context_they_attend_to_grows() -> None:
    assert chunk_for(32, 0) == (32, 32)
    assert chunk_for(32, PREFILL_ATTENTION_TOKENS) == (16, 32)  # each token costs twice
    assert chunk_for(32, 3 * PREFILL_ATTENTION_TOKENS) == (8, 32)
    assert chunk_for(4, 100 * PREFILL_ATTENTION_TOKENS) == (1, 101)  # never stalls: at least one token


def test_with_nobody_decoding_a_prompt_uses_the_whole_step_budget() -> None:
    sched = make(budget=16, chunk=4)
    sched.add(seq("long", 40))
    assert [chunks(run(sched))["long"] for _ in range(3)] == [16, 16, 8]


def test_the_step_budget_caps_decodes_and_admission() -> None:
    sched = make(budget=3, chunk=8)
    for rid in "abcd":
        sched.add(seq(rid, 1))
    assert set(chunks(run(sched))) == {"a", "b", "c"}
    assert chunks(run(sched)) == {"a": 1, "b": 1, "c": 1}  # d waits: the budget is spent on decodes


def test_max_num_seqs_bounds_the_running_batch() -> None:
    sched = make(seqs=2)
    for rid in "abc":
        sched.add(seq(rid))
    run(sched)
    assert [s.request_id for s in sched.running] == ["a", "b"] and len(sched.waiting) == 1


def test_a_cached_prefix_is_skipped_and_counted() -> None:
    sched = make()
    sched.add(seq("a", 9))
    run(sched)
    sched.finish(sched.running[0], FinishReason.STOP)
    b = seq("b", 10)  # same first 9 tokens
    sched.add(b)
    assert chunks(run(sched)) == {"b": 2}  # 2 full blocks (8 tokens) reused
    assert b.num_cached_tokens == 8


def test_higher_priority_is_admitted_first() -> None:
    sched = make(seqs=1)
    sched.add(seq("background", priority=1))
    sched.add(seq("live", priority=0))
    assert list(chunks(run(sched))) == ["live"]


def test_running_out_of_blocks_preempts_the_lowest_priority_and_it_resumes() -> None:
    sched = make(blocks=4, budget=64)
    sched.predecode_row_every = 1  # low decodes in every step beside high
    low, high = seq("low", 7, priority=1), seq("high", 7, priority=0, first=50)
    sched.add(low)
    sched.add(high)
    run(sched)  # 2 blocks each; their 8th positions fit, the 9th needs a fifth block
    run(sched)
    batch = run(sched)
    assert batch.preempted == [low] and chunks(batch) == {"high": 1}
    assert low.status is SeqStatus.WAITING and low.num_computed == 0 and sched.blocks.table("low") == []
    sched.finish(high, FinishReason.STOP)
    c = chunks(run(sched))
    # back: high took low's tail block (evicted first), its head block was still cached: recompute 9 - 4 tokens
    assert c == {"low": 5} and low.status is SeqStatus.RUNNING
    assert low.num_cached_tokens == 0  # usage reports the first admission only


def test_a_sequence_that_cannot_grow_alone_is_preempted_not_crashed() -> None:
    sched = make(blocks=2, budget=64)
    s = seq("a", 8)
    sched.add(s)
    run(sched)  # 8 tokens + 1 output: its next decode needs a third block
    batch = run(sched)
    assert batch.preempted == [s] and batch.empty and s.status is SeqStatus.WAITING


def test_abort_mid_prefill_frees_every_block() -> None:
    sched = make(blocks=16, budget=64, chunk=4)
    sched.add(seq("a"))
    run(sched)
    long = seq("long", 40, first=50)
    sched.add(long)
    run(sched)
    assert 0 < long.num_computed < 40
    sched.finish(long, FinishReason.ABORTED)
    sched.finish(sched.running[0], FinishReason.ABORTED)
    assert sched.blocks.num_free_blocks == 16 and not sched.has_work()


def test_expired_requests_are_finished_at_the_next_step_waiting_or_running() -> None:
    sched = make(seqs=1)
    running, waiting = seq("running", deadline=5.0), seq("waiting", deadline=5.0)
    sched.add(running)
    sched.add(waiting)
    run(sched, now=1.0)
    batch = run(sched, now=6.0)
    assert batch.expired == [waiting, running] or batch.expired == [running, waiting]
    assert {s.finish_reason for s in batch.expired} == {FinishReason.EXPIRED}
    assert batch.empty and sched.blocks.num_free_blocks == 64


def test_finishing_is_a_one_way_transition() -> None:
    sched = make()
    s = seq("a")
    sched.add(s)
    run(sched)
    sched.finish(s, FinishReason.STOP)
    with pytest.raises(RuntimeError):
        s.set_status(SeqStatus.RUNNING)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        make(budget=0)


def test_background_prefill_waits_for_its_turn_while_live_streams_decode() -> None:
    sched = Scheduler(
        BlockManager(64, BS),
        max_num_seqs=8,
        max_num_batched_tokens=64,
        prefill_chunk_tokens=8,
        background_period=3,
        background_step_tokens=10,
    )
    sched.add(seq("live"))
    run(sched)  # live is decoding from now on
    sched.add(seq("pre", 30, priority=1, first=50))
    seen = [chunks(run(sched)) for _ in range(6)]
    assert all(c["live"] == 1 for c in seen)
    # one step in three carries background chunks, whole (not a small chunk in each step)
    assert [c.get("pre", 0) for c in seen] == [0, 0, 10, 0, 0, 10]
    sched.finish(sched.running[0], FinishReason.STOP)  # nobody live: every step is background's
    assert chunks(run(sched)) == {"pre": 10}


def test_a_live_request_preempts_background_work_when_the_batch_is_full() -> None:
    sched = make(seqs=1)
    sched.add(seq("pre", 12, priority=1))
    run(sched)
    sched.add(seq("live", 4, first=50))
    batch = run(sched)
    assert chunks(batch) == {"live": 4}
    pre = sched.waiting[0]
    assert pre.request_id == "pre" and pre.status is SeqStatus.WAITING and sched.blocks.table("pre") == []


def test_blocks_computed_by_background_work_are_counted_once_when_live_work_reuses_them() -> None:
    sched = make()
    pre = seq("pre", 10, priority=1)
    sched.add(pre)
    batch = sched.schedule(0.0)
    pre.num_computed += batch.chunks[0]
    sched.blocks.commit("pre", pre.token_ids, pre.num_computed, speculative=True)
    sched.finish(pre, FinishReason.STOP)
    sched.add(seq("live", 12))  # the same first 10 tokens: 2 full blocks of the pre-load
    run(sched)
    assert sched.background_tokens_used == 2 * BS
    sched.add(seq("again", 12, first=1))  # reusing them a second time is not counted again
    run(sched)
    assert sched.background_tokens_used == 2 * BS


def test_a_burst_of_prompts_takes_the_whole_budget_while_its_first_member_decodes() -> None:
    sched = make(budget=64, chunk=4)
    sched.add(seq("a", 8))
    run(sched)  # a decodes from now on
    for rid in "bcd":
        sched.add(seq(rid, 12, first=20 + 20 * "bcd".index(rid)))
    assert chunks(run(sched)) == {"a": 1, "b": 12, "c": 12, "d": 12}  # 3 first tokens wait, 1 stream decodes


def test_one_prompt_arriving_mid_stream_still_takes_small_chunks() -> None:
    sched = make(budget=64, chunk=4)
    for rid in "ab":
        sched.add(seq(rid, 4, first=1 + 10 * "ab".index(rid)))
    run(sched)
    sched.add(seq("c", 12, first=50))  # 1 first token waits, 2 streams decode
    assert chunks(run(sched)) == {"a": 1, "b": 1, "c": 4}


def test_a_burst_larger_than_one_step_keeps_the_whole_budget_to_its_end() -> None:
    sched = make(budget=40, chunk=4)
    sched.add(seq("a", 8))
    run(sched)  # a decodes from now on
    for i, rid in enumerate("bcdef"):
        sched.add(seq(rid, 12, first=20 + 20 * i))
    assert chunks(run(sched)) == {"a": 1, "b": 12, "c": 12, "d": 12, "e": 3}  # 39 of 40
    # b, c, d decode now, and outnumber the 2 prompts left, but began decoding after those arrived
    assert chunks(run(sched)) == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 9, "f": 12}
