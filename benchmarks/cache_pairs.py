"""Build benchmarks/data/paraphrase/pairs.jsonl (the `blink cache-eval` input) from ../shared/data/paraphrase.

    .venv/bin/python benchmarks/cache_pairs.py [--source ../shared/data/paraphrase]

Labels: a pair may share an answer (1) or may not (0).
- STS-B dev (graded 0-5 by annotators): 1 at 4.0 and above ("mostly equivalent, unimportant details differ"),
  0 at 3.0 and below ("important information differs" or worse); the pairs in between are left out as
  ambiguous. Its negatives are hard ones: same topic, mostly the same words, a different date, count, price,
  agent or direction.
- GPTCache's mock pairs (a statement and its paraphrase): 1.
Licences: STSB-LICENSE.txt (CC BY-SA 4.0 scores; texts under their sources' terms) and GPTCache-LICENSE (MIT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "data" / "paraphrase" / "pairs.jsonl"


def build(source: Path) -> list[dict[str, object]]:
    pairs: list[dict[str, object]] = []
    for line in (source / "sts-dev.tsv").read_text().splitlines():
        fields = line.split("\t")
        score, a, b = float(fields[4]), fields[5], fields[6]
        if score >= 4.0 or score <= 3.0:
            pairs.append({"a": a, "b": b, "label": int(score >= 4.0), "source": "sts-b", "score": score})
    for item in json.loads((source / "gptcache_mock_pairs.json").read_text()):
        pairs.append({"a": item["origin"], "b": item["similar"], "label": 1, "source": "gptcache"})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE.parent.parent / "shared" / "data" / "paraphrase")
    args = parser.parse_args()
    pairs = build(args.source)
    TARGET.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"{TARGET}: {len(pairs)} pairs, {sum(int(bool(p['label'])) for p in pairs)} positive")


if __name__ == "__main__":
    main()
