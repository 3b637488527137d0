"""The routing table: request features, rules and their validation (edge/policy.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from blink.bus.messages import GenerateRequest, Sampling
from blink.edge.policy import (
    DEFAULT_RULES,
    Features,
    difficulty,
    features_of,
    load_rules,
    parse_rules,
)


@dataclasses.dataclass
class Core:
    up: bool = True
    rtt_s: float | None = 0.08
    wait_s: float = 0.0


def request(text: str, *, system: str = "", max_tokens: int | None = 64) -> GenerateRequest:
    messages = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": text},)
    return GenerateRequest("r", "auto", Sampling(max_tokens=max_tokens), messages=messages)


def features(text: str, edge_model: str = "tiny", **kw: object) -> Features:
    return features_of(request(text, **kw), context=2048, edge_wait_s=0.0, core=Core(), edge_model=edge_model)  # type: ignore[arg-type]


def qualified(model: str) -> list[dict[str, object]]:
    """The default table, with `model` measured to answer short chat as well as the core (an operator's table)."""
    return [{**r, "when": {"edge_model": [model]}} if r["name"] == "short-chat" else dict(r) for r in DEFAULT_RULES]


def route(f: Features, table: list[dict[str, object]] | None = None) -> str:
    rules = parse_rules(table if table is not None else list(DEFAULT_RULES))
    return next(r.name for r in rules if r.matches(f))


def test_short_chat_stays_at_the_edge_only_for_an_edge_model_measured_to_answer_it() -> None:
    assert features("What is the capital of France?").kind == "chat"
    assert route(features("What is the capital of France?")) == "edge-not-qualified"  # no bundled model qualifies
    assert route(features("What is the capital of France?"), qualified("tiny")) == "short-chat"
    assert (
        route(features("What is the capital of France?", edge_model="other"), qualified("tiny")) == "edge-not-qualified"
    )


def test_the_default_table_sends_code_documents_and_long_prompts_to_the_core() -> None:
    assert route(features("Write a Python function that reverses a list.")) == "code"
    assert route(features("fix this:\n```\nx = [1, 2\n```")) == "code"
    pasted = "The otter is a carnivorous mammal. " * 60
    assert route(features(pasted + "What do otters eat?")) == "documents"
    assert route(features("Summarise it.", system="Documents:\n\n" + "A chunk of text. ")) == "documents"
    assert route(features("Tell me a story.", max_tokens=1900)) == "too-long-for-edge"


def test_difficulty_grows_with_reasoning_and_arithmetic() -> None:
    easy = difficulty("What is the capital of France?")
    hard = difficulty("Explain why the sky is blue, and compare it with sunsets step by step. What is 17 * 23?")
    assert 0 <= easy < 0.5 <= hard <= 1
    assert route(features("Explain why the sky is blue and compare it with sunsets, step by step.")) == "hard"


def test_an_unreachable_core_keeps_auto_at_the_edge_flagged_degraded() -> None:
    f = features_of(request("Write a Python function."), context=2048, edge_wait_s=0.0, core=Core(up=False, rtt_s=None))
    rules = parse_rules(list(DEFAULT_RULES))
    chosen = next(r for r in rules if r.matches(f))
    assert chosen.name == "core-unreachable" and chosen.route == "edge" and chosen.degraded


def test_a_busy_edge_sends_chat_to_the_core() -> None:
    busy = features_of(request("Hello!"), context=2048, edge_wait_s=2.0, core=Core(rtt_s=0.08, wait_s=0.1))
    assert route(busy, qualified("")) == "edge-busy"
    idle = dataclasses.replace(busy, edge_wait_s=0.05)
    assert route(idle, qualified("")) == "short-chat"


def test_an_operators_table_replaces_the_default(tmp_path: Path) -> None:
    table = [
        {"name": "far", "when": {"core_rtt_over_ms": 200}, "route": "edge"},
        {"name": "rest", "when": {"kind": ["chat", "code"]}, "route": "core"},
    ]
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(table))
    rules = load_rules(str(path))
    assert [r.name for r in rules] == ["far", "rest"]
    near = features("Hello!")
    far = dataclasses.replace(near, core_rtt_ms=250.0)
    assert route(near, table) == "rest" and route(far, table) == "far"


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ([], "non-empty JSON list"),
        ([{"when": {"colour": "red"}, "route": "edge"}], "unknown condition 'colour'"),
        ([{"when": {"difficulty_over": "high"}, "route": "edge"}], "difficulty_over takes"),
        ([{"when": {"core_up": 1}, "route": "edge"}], "core_up takes"),
        ([{"when": {"prompt_tokens_over": True}, "route": "edge"}], "prompt_tokens_over takes"),
        ([{"when": {}, "route": "moon"}], "'route' is 'edge' or 'core'"),
        ([{"when": {}, "route": "edge", "extra": 1}], "an object of name, when, route and degraded"),
        ([{"when": [], "route": "edge"}], "'when' is an object"),
    ],
)
def test_a_bad_table_is_refused_with_its_reason(table: list[object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_rules(table)


def test_a_routing_file_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"--routing .*routing\.json"):
        load_rules(str(path))
