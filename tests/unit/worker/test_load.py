"""The queue-wait estimate a replica heartbeats (worker/load.py): grounded in measured rates, never a guess."""

from __future__ import annotations

import pytest

from blink.worker.load import LoadEstimator, Queue


def test_nothing_measured_estimates_no_wait_whatever_the_queue() -> None:
    assert LoadEstimator().wait_s(Queue(pending_prefill_tokens=10_000, waiting=50, free_slots=0)) == 0.0


def test_the_wait_is_the_prefill_backlog_over_the_measured_rate() -> None:
    load = LoadEstimator()
    load.prefilled(1000, 2.0)  # 500 tokens/s
    assert load.wait_s(Queue(pending_prefill_tokens=1500, waiting=0, free_slots=4)) == pytest.approx(3.0)
    load.prefilled(100, 1.0)  # 100 tokens/s moves the average a fifth of the way: 420 tokens/s
    assert load.prefill_rate == pytest.approx(420.0)


def test_with_every_slot_taken_requests_ahead_wait_for_finishes() -> None:
    load = LoadEstimator()
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):  # one finish a second
        load.finished(now=t)
    full = Queue(pending_prefill_tokens=0, waiting=3, free_slots=0)
    assert load.finish_rate(now=4.0) == pytest.approx(1.0)
    assert load.wait_s(full, now=4.0) == pytest.approx(4.0)  # 3 ahead + itself, one per second
    assert load.wait_s(Queue(0, waiting=3, free_slots=8), now=4.0) == 0.0  # slots free: no wait for one
    # a stall shows: with no finish for a while, the rate over the window falls and the wait grows
    assert load.wait_s(full, now=14.0) == pytest.approx(4 / (4 / 14))


def test_finishes_older_than_the_window_say_nothing() -> None:
    load = LoadEstimator()
    load.finished(now=0.0)
    load.finished(now=1.0)
    assert load.finish_rate(now=1000.0) is None
    assert load.wait_s(Queue(0, waiting=5, free_slots=0), now=1000.0) == 0.0
