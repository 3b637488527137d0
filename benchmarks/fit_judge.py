"""Fit the semantic cache's judge (semantic_cache/judge.py) on labelled question pairs; write its weights.

  python -m benchmarks.fit_judge [--pairs ../shared/data/paraphrase/qqp-dev.jsonl] [--embedder onnx-int8]

Each pair goes to the fitting part or the held-out part by a hash of its text (60% / 40%), so the split is the
same on every machine and a pair never moves. The model is a logistic regression (Newton's method, L2) over
judge.features, fitted on the fitting part's pairs that the judge sees in service: cosine at least the gate minus
0.05, and no rule of verify.py objecting. Its operating points are measured on the held-out part, for the whole
decision (gate, rules and judge): the false-hit rate (share of the held-out non-duplicates it accepts; Quora's
non-duplicate pairs are related questions, often a word apart) and the recall (share of the held-out duplicates
it accepts). Also printed: precision against the close non-duplicates (word-Jaccard >= 0.6) as issue 18 measures
it, with the held-out part's own ratio of duplicates to them and with as many of each.
Writes src/blink/semantic_cache/judge_weights.py. Embeddings are cached under the model cache directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from blink.config import CacheConfig, default_cache_dir
from blink.semantic_cache.embedder import load_embedder
from blink.semantic_cache.judge import FEATURES, features
from blink.semantic_cache.verify import disagreement

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAIRS = ROOT.parent / "shared" / "data" / "paraphrase" / "qqp-dev.jsonl"
OUT = ROOT / "src" / "blink" / "semantic_cache" / "judge_weights.py"
RATES = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


def held_out(a: str, b: str) -> bool:
    """The pair's part: 4 in 10 held out, by a hash of its text."""
    return hashlib.sha256(f"{a}\n{b}".encode()).digest()[0] % 10 >= 6


def cosines(pairs: list[dict[str, object]], path: Path, embedder_name: str) -> np.ndarray:
    key = hashlib.sha256(path.read_bytes() + embedder_name.encode()).hexdigest()[:16]
    cached = default_cache_dir() / f"judge-embeddings-{key}.npy"
    if cached.exists():
        vectors = np.load(cached)
    else:
        embedder = load_embedder(embedder_name, default_cache_dir())
        vectors = embedder.embed([str(p["a"]) for p in pairs] + [str(p["b"]) for p in pairs])
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, vectors)
    n = len(pairs)
    return np.asarray((vectors[:n] * vectors[n:]).sum(1))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 30) -> np.ndarray:
    """Weights [intercept, coef...] of an L2-regularised logistic regression, by Newton's method."""
    z = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _tuple(name: str, items: object) -> str:
    # json.dumps: double quotes, as the formatter writes them (tuples of numbers print the same either way)
    rows = "".join(f"    {json.dumps(item) if isinstance(item, str) else repr(item)},\n" for item in items)  # type: ignore[attr-defined]
    return f"{name} = (\n{rows})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--embedder", default=CacheConfig().cache_embedder)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--held-out",
        type=Path,
        help="also write the held-out part's duplicates and close non-duplicates here "
        "(JSON Lines for `blink cache-eval`: issue 18's evaluation set)",
    )
    args = parser.parse_args()
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    cos = cosines(pairs, args.pairs, args.embedder)
    gate = CacheConfig().cache_threshold
    x = np.array([features(p["a"], p["b"], float(c)) for p, c in zip(pairs, cos, strict=True)])
    y = np.array([p["label"] for p in pairs], dtype=float)
    out = np.array([held_out(p["a"], p["b"]) for p in pairs])
    ruled = np.array([disagreement(p["a"], p["b"]) is not None for p in pairs])
    seen = (cos >= gate - 0.05) & ~ruled
    fit = ~out & seen
    mean, scale = x[fit].mean(0), x[fit].std(0) + 1e-9
    w = fit_logistic((x[fit] - mean) / scale, y[fit])
    score = w[0] + ((x - mean) / scale) @ w[1:]

    judged = out & (cos >= gate) & ~ruled
    negatives, positives = out & (y == 0), out & (y == 1)
    close = negatives & (x[:, FEATURES.index("word jaccard")] >= 0.6)
    curve, table = [], []
    for threshold in sorted(set(np.quantile(score[judged], np.linspace(0, 0.99, 100)).round(4))):
        accepted = judged & (score >= threshold)
        rate = float((accepted & negatives).sum() / negatives.sum())
        recall = float((accepted & positives).sum() / positives.sum())
        curve.append((float(threshold), round(rate, 5), round(recall, 4)))
        true, false = int((accepted & positives).sum()), int((accepted & close).sum())
        close_rate = false / close.sum()
        table.append((threshold, rate, recall, true / max(1, true + false), recall / max(1e-9, recall + close_rate)))
    lines = [
        '"""Generated by `python -m benchmarks.fit_judge`: do not edit. The judge\'s fitted weights (judge.py).',
        f"Fitted on {int(fit.sum())} pairs of {args.pairs.name} ({int(y[fit].sum())} duplicates); operating points",
        f"measured on its held-out part ({int(positives.sum())} duplicates, {int(negatives.sum())} non-duplicates), "
        f"gate {gate}.",
        '"""',
        "",
        _tuple("FEATURES", FEATURES),
        _tuple("MEAN", [round(float(v), 6) for v in mean]),
        _tuple("SCALE", [round(float(v), 6) for v in scale]),
        _tuple("COEF", [round(float(v), 6) for v in w[1:]]),
        f"INTERCEPT = {round(float(w[0]), 6)!r}",
        "# (log-odds threshold, false-hit rate on the held-out non-duplicates, recall of the held-out duplicates) of",
        "# the whole decision (gate, rules, judge), thresholds rising",
        _tuple("CURVE", curve),
        "",
    ]
    args.out.write_text("\n".join(lines))
    if args.held_out:
        keep = positives | close
        args.held_out.write_text("".join(json.dumps(p) + "\n" for p, k in zip(pairs, keep, strict=True) if k))
    print(f"wrote {args.out}")
    print("threshold | false-hit rate | recall | precision vs close non-duplicates (held-out ratio, 1:1)")
    for t, rate, recall, natural, balanced in table[::5]:
        print(f"{t:8.3f} | {100 * rate:6.2f}% | {100 * recall:6.2f}% | {100 * natural:6.2f}%, {100 * balanced:6.2f}%")


if __name__ == "__main__":
    main()
