from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from pathlib import Path

import pytest

from blink.bench import workload as w
from blink.config import BenchConfig

ROWS = [
    w.TraceRow(0.0, 6758, 500, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)),
    w.TraceRow(0.0, 900, 1, (0, 20)),
    w.TraceRow(3.0, 7322, 2000, (0, 1, 2, 3, 4, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39)),
    w.TraceRow(6.0, 126195, 350, tuple(range(100, 347))),
]


def write_trace(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_poisson_arrivals_are_seeded_and_have_the_rate() -> None:
    a = w.poisson_arrivals(4.0, 500.0, seed=7)
    assert a == w.poisson_arrivals(4.0, 500.0, seed=7)
    assert a != w.poisson_arrivals(4.0, 500.0, seed=8)
    assert a == sorted(a) and a[0] > 0 and a[-1] < 500
    assert len(a) / 500 == pytest.approx(4.0, rel=0.1)
    gaps = [b - x for x, b in itertools.pairwise(a)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)
    with pytest.raises(ValueError):
        w.poisson_arrivals(0, 10, 0)


def test_trace_arrivals_are_scaled_shifted_and_cut_at_the_duration() -> None:
    assert w.trace_arrivals(ROWS, 1.0, 0.0, 10.0) == [0.0, 0.0, 3.0, 6.0]
    assert w.trace_arrivals(ROWS, 0.5, 0.0, 10.0) == [0.0, 0.0, 6.0]  # half speed: 6 s of trace takes 12 s
    assert w.trace_arrivals(ROWS, 2.0, 3.0, 10.0) == [0.0, 1.5]
    with pytest.raises(ValueError):
        w.trace_arrivals(ROWS, 0.0, 0.0, 10.0)


def test_load_trace_sorts_and_starts_at_zero(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 5000, "input_length": 10, "output_length": 2, "hash_ids": [0, 1]},
        {"timestamp": 2000, "input_length": 20, "output_length": 3, "hash_ids": [0]},
    ]
    trace = w.load_trace(write_trace(tmp_path / "t.jsonl", rows))
    assert [(r.at_s, r.input_length, r.hash_ids) for r in trace] == [(0.0, 20, (0,)), (3.0, 10, (0, 1))]
    with pytest.raises(ValueError, match=r"t\.jsonl:2"):
        w.load_trace(write_trace(tmp_path / "t.jsonl", [rows[0], {"timestamp": 1}]))


def test_the_real_trace_loads() -> None:
    """The Mooncake trace's format, from the head of it kept in the repository (tests/e2e/data/SOURCE.md)."""
    path = Path(__file__).parents[2] / "e2e" / "data" / "mooncake_conversation_head.jsonl"
    trace = w.load_trace(path)
    assert len(trace) == 60 and trace[0].at_s == 0 and trace[-1].at_s == 15.0
    assert len(w.trace_arrivals(trace, 1.0, 0.0, 16.0)) == 60
    assert len(w.trace_arrivals(trace, 0.5, 0.0, 16.0)) == sum(r.at_s < 8.0 for r in trace)


@pytest.mark.parametrize(
    ("spec", "stages"),
    [
        ("8", [(8, 0, 60)]),
        ("1,2,4", [(1, 0, 20), (2, 20, 40), (4, 40, 60)]),
        ("1:10,4", [(1, 0, 10), (4, 10, 60)]),
        ("2:30,6:30", [(2, 0, 30), (6, 30, 60)]),
    ],
)
def test_parse_ramp(spec: str, stages: list[tuple[int, float, float]]) -> None:
    assert [(s.users, s.start_s, s.end_s) for s in w.parse_ramp(spec, 60.0)] == stages


@pytest.mark.parametrize("spec", ["", "x", "0", "2:-1", "1:60,2", "1:50,2:20"])
def test_parse_ramp_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="--concurrency"):
        w.parse_ramp(spec, 60.0)


def test_same_seed_same_sessions_in_any_order() -> None:
    sessions = w.Sessions(BenchConfig(seed=3))
    forward = [sessions.job(i, 0.0) for i in range(20)]
    backward = [sessions.job(i, 0.0) for i in reversed(range(20))][::-1]
    assert forward == backward
    assert forward != [w.Sessions(BenchConfig(seed=4)).job(i, 0.0) for i in range(20)]


def test_synthetic_sessions_are_bounded() -> None:
    cfg = BenchConfig(max_prompt_tokens=120, max_output_tokens=40, question_words=6)
    for i in range(200):
        job = w.Sessions(cfg).job(i, 0.0)
        assert len(job.prompt.split()) <= 120
        assert w.MIN_OUTPUT_TOKENS <= job.max_tokens <= 40
        assert 1 <= len(job.question) <= 6
        assert job.context.startswith(w.block_text(0))  # block 0 is every session's shared start


def test_trace_lengths_are_mapped_down_and_prefixes_shared() -> None:
    cfg = BenchConfig(max_prompt_tokens=256, max_output_tokens=64, question_words=8)
    sessions = w.Sessions(cfg, ROWS)
    jobs = [sessions.job(i, 0.0) for i in range(4)]
    assert [len(j.context.split()) // w.BLOCK_WORDS for j in jobs] == [14, 2, 15, (256 - 8) // w.BLOCK_WORDS]
    assert [j.max_tokens for j in jobs] == [50, w.MIN_OUTPUT_TOKENS, 64, 35]
    shared = 5 * w.BLOCK_WORDS  # rows 0 and 2 share their first five hash ids
    a, b = jobs[0].context.split(), jobs[2].context.split()
    assert a[:shared] == b[:shared] and a[shared:] != b[shared:]
    assert sessions.job(4, 0.0).context == jobs[0].context  # the rows are used in turn


def test_drafts_grow_to_the_prompt() -> None:
    job = w.Sessions(BenchConfig()).job(0, 0.0)
    drafts = [job.draft(n) for n in range(1, len(job.question) + 1)]
    assert all(b.startswith(a) for a, b in itertools.pairwise(drafts))
    assert drafts[-1] == job.prompt


def test_interrupts_and_documents_follow_their_fractions() -> None:
    never = BenchConfig(interrupt_fraction=0.0, document_fraction=0.0)
    assert all(
        j.interrupt_after is None and j.document is None for j in map(w.Sessions(never).job, range(50), [0.0] * 50)
    )
    always = dataclasses.replace(never, interrupt_fraction=1.0, document_fraction=1.0)
    for job in map(w.Sessions(always).job, range(50), [0.0] * 50):
        assert job.interrupt_after is not None and 1 <= job.interrupt_after <= max(1, job.max_tokens // 2)
        assert job.document is not None and 0 <= job.document < w.DOCUMENTS
    some = dataclasses.replace(never, interrupt_fraction=0.3)
    share = sum(w.Sessions(some).job(i, 0.0).interrupt_after is not None for i in range(1000)) / 1000
    assert share == pytest.approx(0.3, abs=0.05)


def test_documents_are_deterministic() -> None:
    docs = w.documents(1)
    assert docs == w.documents(1) and docs != w.documents(2)
    assert len(docs) == w.DOCUMENTS and len({d for d, _ in docs}) == w.DOCUMENTS
    assert all(len(text.split()) >= w.DOCUMENT_WORDS for _, text in docs)


def test_open_loop_prefers_the_rate_then_the_trace() -> None:
    cfg = BenchConfig(duration_s=10.0, seed=1)
    assert w.open_loop(cfg, ROWS) == w.trace_arrivals(ROWS, 1.0, 0.0, 10.0)
    assert w.open_loop(cfg, []) == w.poisson_arrivals(1.0, 10.0, 1)
    assert w.open_loop(dataclasses.replace(cfg, rate=3.0), ROWS) == w.poisson_arrivals(3.0, 10.0, 1)
