"""The keystroke replay's plans (bench/typing.py): pure and seeded, with the published typing statistics."""

from __future__ import annotations

import itertools
import statistics

from blink.bench import typing as t
from blink.bench.clients import Target
from blink.bench.typing_run import _counters, summarize


def plans(edit: float = 0.0, users: int = 16, questions: int = 30):  # type: ignore[no-untyped-def]
    return [q for user in t.typing_sessions(users, questions, 3, edit_fraction=edit) for q in user]


def test_the_same_seed_gives_the_same_keystrokes() -> None:
    assert t.typing_sessions(2, 5, 1, edit_fraction=0.3) == t.typing_sessions(2, 5, 1, edit_fraction=0.3)
    assert t.typing_sessions(2, 5, 1, edit_fraction=0.3) != t.typing_sessions(2, 5, 2, edit_fraction=0.3)


def test_without_edits_the_submitted_text_is_the_question_and_the_keys_match_the_studies() -> None:
    qs = plans()
    assert all(q.text in t.QUESTIONS and not q.revision for q in qs)
    kspc = sum(q.keystrokes for q in qs) / sum(len(q.text) for q in qs)
    assert 1.10 < kspc < 1.25  # Dhakal et al.: 1.173
    typing = [k.delay_s for q in qs for k in q.keys]
    assert 0.18 < statistics.mean(typing) < 0.40  # mean IKI 239 ms, plus the odd planning pause
    pauses = [q.pause_s for q in qs]
    assert 1.1 < statistics.mean(pauses) < 1.6  # KLM's M: 1.35 s


def test_every_key_is_one_keystroke_away_from_the_last() -> None:
    for q in plans(edit=0.5, users=4):
        texts = ["", *(k.text for k in q.keys), *(k.text for k in q.revision)]
        for a, b in itertools.pairwise(texts):
            assert b == a or (b[:-1] == a) or (a[:-1] == b), (a, b)  # typed one, erased one, or Enter


def test_an_edit_before_enter_submits_other_text_than_the_pause() -> None:
    qs = plans(edit=1.0, users=4, questions=10)
    assert all(q.revision and q.text != q.still_text for q in qs)
    assert all(q.text.rstrip("?.!").rsplit(" ", 1)[1] in t.REVISIONS for q in qs)


def test_the_summary_counts_still_and_edited_submits_and_the_servers_counters() -> None:
    from blink.bench.typing_run import Submit

    submits = [
        Submit(
            0, still=True, stamps=[0.01, 0.02, 0.03], output_tokens=3, prompt_tokens=40, cached_tokens=32, predecoded=2
        ),
        Submit(1, still=False, stamps=[0.05, 0.06], output_tokens=2, prompt_tokens=40, cached_tokens=16),
        Submit(2, still=True, error="timeout"),
    ]
    counters = _counters(
        'blink_preload_prefill_tokens_total{model="m",replica="r"} 90.0\n'
        'blink_preload_used_tokens_total{model="m",replica="r"} 30.0\n'
        'blink_predecode_tokens_total{outcome="adopted"} 8.0\n'
        'blink_predecode_tokens_total{outcome="wasted"} 4.0\n'
    )
    s = summarize(Target("http://x", "ws", "x"), submits, counters, 10.0, [plans(users=1, questions=3)])
    assert s["submits"] == 3 and s["errors"] == 1
    assert s["still"]["n"] == 1 and s["edited"]["n"] == 1
    assert s["enter_ttft_ms"]["p50"] == 50.0 and s["still"]["p50"] == 10.0
    assert s["wasted_prefill_per_useful"] == 2.0 and s["wasted_decode_per_useful"] == 0.5
    assert s["predecoded_share"] == 0.5 and s["cached_share"] == 0.6
