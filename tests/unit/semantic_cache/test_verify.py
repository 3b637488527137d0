"""The verification step: pairs close in meaning that must not share an answer, and paraphrases that may."""

from __future__ import annotations

import pytest

from blink.semantic_cache.verify import disagreement

MUST_DIFFER = [
    ("How do I cancel my subscription?", "How do I un-cancel my subscription?"),
    ("How do I cancel my subscription?", "How do I uncancel my subscription?"),
    ("Refund 100 USD to my card", "Refund 1000 USD to my card"),
    ("Refund 1,000 USD to my card", "Refund 100 USD to my card"),
    ("What is 2.5 times 4?", "What is 25 times 4?"),
    ("Why is my order late?", "Why is my order not late?"),
    ("Can I pay by card?", "Can't I pay by card?"),
    ("Show flights on Tuesday", "Show flights on Wednesday"),
    ("Chinese shares close higher", "Chinese shares close lower"),
    ("How do I enable two-factor login?", "How do I disable two-factor login?"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("Convert five euros to dollars", "Convert seven euros to dollars"),
    ("Which is bigger, a cat or a dog?", "Which is smaller, a cat or a dog?"),
    ("Book a table for 2 at 7pm", "Book a table for 2 at 8pm"),
]

MAY_AGREE = [
    ("How do I cancel my subscription?", "how can I cancel my subscription"),
    ("What is the capital of France?", "what's france's capital city?"),
    ("Refund 1,000 USD please", "please refund 1000 USD"),
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("Where is the Eiffel Tower?", "where is the eiffel tower located"),
    ("I don't understand this error", "I do not understand this error"),
]


@pytest.mark.parametrize(("a", "b"), MUST_DIFFER)
def test_details_that_change_the_answer_are_caught_both_ways(a: str, b: str) -> None:
    assert disagreement(a, b) is not None
    assert disagreement(b, a) is not None


@pytest.mark.parametrize(("a", "b"), MAY_AGREE)
def test_paraphrases_pass(a: str, b: str) -> None:
    assert disagreement(a, b) is None, disagreement(a, b)


def test_a_text_agrees_with_itself() -> None:
    for a, b in MUST_DIFFER + MAY_AGREE:
        assert disagreement(a, a) is None
        assert disagreement(b, b) is None
