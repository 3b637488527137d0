"""`blink cache-eval`: its input checks (fast) and one real run with the real embedder (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blink.cli import main


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("not json", ":1: not JSON"),
        ('{"a": "x", "b": "y"}', ":1: expected"),
        ('{"a": "x", "b": "y", "label": 2}', ":1: expected"),
        ('{"a": "x", "b": "y", "label": true}', ":1: expected"),
        ('{"a": 1, "b": "y", "label": 1}', ":1: expected"),
        ('["a", "b", 1]', ":1: expected"),
    ],
)
def test_a_malformed_line_is_named_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, complaint: str
) -> None:
    assert main(["cache-eval", str(write(tmp_path / "p.jsonl", [line]))]) == 2
    assert complaint in capsys.readouterr().err


def test_an_empty_or_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache-eval", str(write(tmp_path / "empty.jsonl", [""]))]) == 2
    assert main(["cache-eval", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no pairs" in err and "missing.jsonl" in err


@pytest.mark.slow
def test_a_run_reports_hits_false_hits_and_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = [
        {"a": "How do I reset my password?", "b": "how can I reset my password", "label": 1},
        {"a": "What is the capital of France?", "b": "what's the capital of france?", "label": 1},
        {"a": "How do I cancel my subscription?", "b": "How do I un-cancel my subscription?", "label": 0},
        {"a": "Send 100 USD to Alice", "b": "Send 1000 USD to Alice", "label": 0},
        {"a": "What is the capital of France?", "b": "How do volcanoes form?", "label": 0},
    ]
    path = write(tmp_path / "pairs.jsonl", [json.dumps(p) for p in pairs])
    assert main(["cache-eval", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["positives"], result["negatives"]) == (2, 3)
    assert result["true_hits"] == 2 and result["false_hits"] == 0 and result["precision"] == 1.0
    assert result["rejected_by_verification"] == 2  # the negation and the number: close, but refused
    assert result["lookup_ms"][str(50)] > 0 and 0 < result["embedding_share"] <= 1
    assert main(["cache-eval", str(path), "--no-cache-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["false_hits"] >= 1
