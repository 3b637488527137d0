"""The hit decision past the cosine gate and verify.py's rules: may a cached question's answer answer this one?

A logistic model over features of the pair (`features`): the embeddings' cosine, how many words and content
words the two share, what only one side has (how many content words, pronouns, a different question word),
whether the shared words keep their order, and the lengths. Fitted by `python -m benchmarks.fit_judge` on part
of ../shared/data/paraphrase/qqp-dev.jsonl (human-labelled question pairs, the kind users type), on the pairs
the judge sees in service (cosine near or above the gate, no rule objecting); its weights, and the false-hit
rate and recall of each operating point on the part it never saw, are in judge_weights.py.

The operator chooses a target false-hit rate (`--cache-false-hit-rate`, default 1%): the share of questions
that need another answer (Quora's non-duplicate pairs: related questions, often a word apart) that the cache
would answer all the same. `Judge(target)` takes the loosest operating point whose measured rate is within it.
Pure Python, tens of microseconds per candidate.
"""

from __future__ import annotations

import math
import re

from blink.semantic_cache import judge_weights

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


_FUNCTION = _set(
    "a an the is are was were be been being do does did of to and what how which can could should would will "
    "shall may might must it its this that there"
)
_PRONOUNS = _set("i me my mine you your yours he him his she her hers we our us they their them")
_QUESTION = ("what", "how", "why", "which", "who", "when", "where", "is", "are", "can", "do", "does", "should")

FEATURES = (
    "cosine",
    "word jaccard",
    "content-word jaccard",
    "content words only on the side with fewer",
    "content words only on the side with more",
    "shared content words out of order",
    "different question word",
    "length difference (words)",
    "length (words, both)",
    "different pronouns",
    "same words, other order",
)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("’", "'"))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            cur = row[j + 1]
            row[j + 1] = prev + 1 if x == y else max(row[j + 1], row[j])
            prev = cur
    return row[-1]


def features(query: str, candidate: str, similarity: float) -> list[float]:
    """The pair's features, in FEATURES' order; symmetric in the two texts."""
    ta, tb = _tokens(query)[:64], _tokens(candidate)[:64]
    sa, sb = set(ta), set(tb)
    ca, cb = [w for w in ta if w not in _FUNCTION], [w for w in tb if w not in _FUNCTION]
    csa, csb = set(ca), set(cb)
    only = sorted((len(csa - csb), len(csb - csa)))
    shared_a, shared_b = [w for w in ca if w in csb], [w for w in cb if w in csa]
    in_order = _lcs(shared_a, shared_b) / max(1, min(len(shared_a), len(shared_b)))
    question = next((w for w in ta if w in _QUESTION), ""), next((w for w in tb if w in _QUESTION), "")
    return [
        similarity,
        len(sa & sb) / max(1, len(sa | sb)),
        len(csa & csb) / max(1, len(csa | csb)),
        float(only[0]),
        float(only[1]),
        1.0 - in_order if shared_a and shared_b else 0.0,
        float(question[0] != question[1]),
        float(abs(len(ta) - len(tb))),
        float(len(ta) + len(tb)),
        float((sa & _PRONOUNS) != (sb & _PRONOUNS)),
        float(sa == sb and ta != tb),
    ]


def logit(values: list[float], weights: tuple[float, ...], mean: tuple[float, ...], scale: tuple[float, ...]) -> float:
    return sum(w * (v - m) / s for v, w, m, s in zip(values, weights, mean, scale, strict=True))


class Judge:
    """The fitted model at the operating point for `false_hit_rate` (judge_weights.CURVE)."""

    def __init__(self, false_hit_rate: float = 0.01) -> None:
        if not 0 < false_hit_rate < 1:
            raise ValueError(f"false_hit_rate must be in (0, 1), got {false_hit_rate}")
        curve = judge_weights.CURVE  # (threshold, false-hit rate, recall), thresholds rising, rates falling
        within = [point for point in curve if point[1] <= false_hit_rate] or [curve[-1]]
        self.threshold, self.false_hit_rate, self.recall = within[0]

    @staticmethod
    def score(query: str, candidate: str, similarity: float) -> float:
        """The model's log-odds that `candidate`'s answer answers `query`; infinite for the same words in the
        same order (case and punctuation aside), which the model, fitted on pairs that differ, undervalues."""
        if _tokens(query) == _tokens(candidate):
            return math.inf
        w = judge_weights
        return w.INTERCEPT + logit(features(query, candidate, similarity), w.COEF, w.MEAN, w.SCALE)

    def accepts(self, query: str, candidate: str, similarity: float) -> bool:
        return self.score(query, candidate, similarity) >= self.threshold

    @staticmethod
    def probability(score: float) -> float:
        return 1.0 / (1.0 + math.exp(-score))
