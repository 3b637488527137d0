"""The judge (semantic_cache/judge.py): its operating point follows the operator's target, and its weights file
matches its features."""

from __future__ import annotations

import pytest

from blink.semantic_cache import judge_weights
from blink.semantic_cache.judge import FEATURES, Judge, features


def test_a_lower_target_false_hit_rate_takes_a_stricter_operating_point() -> None:
    loose, default, strict = Judge(0.1), Judge(0.01), Judge(0.002)
    assert loose.threshold < default.threshold < strict.threshold
    assert loose.recall > default.recall > strict.recall
    for judge, target in ((loose, 0.1), (default, 0.01), (strict, 0.002)):
        assert judge.false_hit_rate <= target


@pytest.mark.parametrize("target", [0, 1, -0.5, 2])
def test_a_target_outside_0_and_1_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="false_hit_rate"):
        Judge(target)


def test_the_same_words_in_the_same_order_are_always_accepted() -> None:
    judge = Judge(0.002)
    assert judge.accepts("Why is the sky blue?", "why is the sky blue", 0.8)
    assert not judge.accepts("Why is the sky blue?", "Why is the sea blue?", 0.8)


def test_the_features_are_symmetric_and_the_weights_file_is_for_them() -> None:
    a, b = "What is the best laptop for students?", "Which laptop is best for a student in college?"
    assert features(a, b, 0.9) == features(b, a, 0.9)
    assert judge_weights.FEATURES == FEATURES
    assert len(judge_weights.COEF) == len(judge_weights.MEAN) == len(judge_weights.SCALE) == len(FEATURES)
    rates = [rate for _, rate, _ in judge_weights.CURVE]
    assert rates == sorted(rates, reverse=True)  # thresholds rise, rates fall
