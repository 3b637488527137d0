"""Where an edge answers a request: `model: "auto"` goes through a table of rules, first match wins; a request
naming a model goes where that model is (this edge's, or the core's over the link).

    router = Router(bus, local_model="smollm2-135m-instruct", rules=DEFAULT_RULES)
    decision = router.decide(request)          # Decision(model, route "edge" | "core", rule, degraded)

The semantic cache is looked up before any rule (a hit is route "cache"). A rule's `when` holds conditions on the
request's features, all of which must hold (an empty `when` always matches):

    core_up: bool               the link to the core is connected
    edge_model: str | [str]     the edge's own model is one of these (a rule that holds only for models measured
                                to answer that class as well as the core)
    kind: str | [str]           "code" (code fences, code words), "document" (retrieved or pasted documents, a long
                                message), else "chat"
    context_over: float         (estimated prompt tokens + max_tokens) / the edge model's context is over this
    prompt_tokens_over: int     estimated prompt tokens (characters / 3.5, an overestimate for English) over this
    max_tokens_over: int        the answer asked for is longer than this (unset: DEFAULT_ANSWER_TOKENS)
    difficulty_over: float      the difficulty score (0..1, `difficulty`) is over this
    edge_wait_over_s: float     the edge's replicas estimate a new request's first token further than this
    edge_slower: bool           the edge's estimated wait is over the core's plus one link round trip
    core_rtt_over_ms: float     the link's smoothed round trip is over this

and says `route` ("edge" or "core") and optionally `degraded` (the answer is the edge's where the core's was
wanted: flagged to the client). Operators replace the table with `blink edge --routing FILE` (a JSON list of rules).

The default table keeps a request at the edge only where a quality rule holds: short chat (not code, not a document,
not judged hard, the edge not busier than the core) when the edge's model is one measured to answer it as well as the
core (QUALIFIED_EDGE_MODELS; benchmarks/edge.py reports each class's agreement with the core's answers and each
route's latency), and everything while the core is unreachable (flagged degraded). No bundled model qualifies yet,
so by default `auto` goes to the core while it is reachable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from blink.bus.messages import GenerateRequest, ReplicaState, ReplicaStatus

AUTO = "auto"  # the model name that asks the edge to choose
DEFAULT_ANSWER_TOKENS = 256  # a request without max_tokens is taken to want this many
DEFAULT_CONTEXT = 2048  # the edge model's context when no replica has said it yet
CHARS_PER_TOKEN = 3.5

# Edge models measured (benchmarks/edge.py, against the core's answers on the same prompts, by the quality rule in
# its report) to answer short chat as well as the core does: a rule keeping requests at the edge names them. None of
# the bundled models is yet: on short factual questions SmolLM2-135M-Instruct agreed with Qwen2.5-Coder-1.5B-Instruct
# on 15 of 24 and Qwen2.5-Coder-0.5B-Instruct on 18 of 24, under the 80% the rule asks (results/edge.md). An operator
# who measures their own edge model names it in their table (--routing).
QUALIFIED_EDGE_MODELS: tuple[str, ...] = ()

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"name": "core-unreachable", "when": {"core_up": False}, "route": "edge", "degraded": True},
    {"name": "too-long-for-edge", "when": {"context_over": 0.75}, "route": "core"},
    {"name": "code", "when": {"kind": "code"}, "route": "core"},
    {"name": "documents", "when": {"kind": "document"}, "route": "core"},
    {"name": "hard", "when": {"difficulty_over": 0.5}, "route": "core"},
    {"name": "edge-busy", "when": {"edge_slower": True}, "route": "core"},
    {"name": "short-chat", "when": {"edge_model": list(QUALIFIED_EDGE_MODELS)}, "route": "edge"},
    {"name": "edge-not-qualified", "when": {}, "route": "core"},
)

_CODE = re.compile(
    r"```|^\s*(def|class|import|from|fn|func|public|#include)\b|[;{}]\s*$|\b(code|program|script|function|python|"
    r"javascript|typescript|java|rust|golang|c\+\+|sql|regex|bash|compile|refactor|stack ?trace|bug)\b",
    re.IGNORECASE | re.MULTILINE,
)
_REASONING = re.compile(
    r"\b(why|explain|compare|contrast|prove|derive|analy[sz]e|evaluate|justify|step[- ]by[- ]step|reason(ing)?|"
    r"implications?|trade-?offs?|design|optimi[sz]e|calculate|solve|plan|strategy|pros and cons)\b",
    re.IGNORECASE,
)
_ARITHMETIC = re.compile(r"\d+(\.\d+)?\s*[-+*/^x×÷]\s*\d+")
DOCUMENT_MARK = "Documents:\n\n"  # the realtime prompt's context block (gateway/realtime/prompt.py)
LONG_MESSAGE_CHARS = 1500


def difficulty(text: str, turns: int = 1) -> float:
    """A cheap score (0..1) of how hard a question is for a small model: reasoning words, several questions at
    once, arithmetic, its length, a long conversation. Calibrated on benchmarks/edge.py's workload, not a model."""
    words = len(text.split())
    score = 0.3 * min(1.0, words / 80)
    score += 0.25 * min(2, len(_REASONING.findall(text)))
    score += 0.15 if text.count("?") >= 2 else 0.0
    score += 0.15 if _ARITHMETIC.search(text) else 0.0
    score += 0.1 if turns > 6 else 0.0
    return min(1.0, score)


@dataclass(frozen=True)
class Features:
    kind: str
    prompt_tokens: int
    max_tokens: int
    context_fraction: float
    difficulty: float
    edge_wait_s: float
    core_wait_s: float
    core_rtt_ms: float
    core_up: bool
    edge_model: str = ""


def features_of(
    request: GenerateRequest, *, context: int, edge_wait_s: float, core: CoreView, edge_model: str = ""
) -> Features:
    messages = list(request.messages or ())
    if messages:
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        text = "".join(m.get("content", "") for m in messages)
        earlier = messages[:-1]
    else:
        last = text = request.prompt or ""
        earlier = []
    tokens = math.ceil(len(text) / CHARS_PER_TOKEN) + 4 * len(messages)
    wanted = request.sampling.max_tokens or DEFAULT_ANSWER_TOKENS
    documented = any(DOCUMENT_MARK in m.get("content", "") for m in messages) or any(
        len(m.get("content", "")) > LONG_MESSAGE_CHARS for m in messages
    )
    if _CODE.search(last):
        kind = "code"
    elif documented or len(last) > LONG_MESSAGE_CHARS:
        kind = "document"
    else:
        kind = "chat"
    rtt = core.rtt_s
    return Features(
        kind=kind,
        prompt_tokens=tokens,
        max_tokens=wanted,
        context_fraction=(tokens + wanted) / max(1, context),
        difficulty=difficulty(last, turns=len(earlier) + 1),
        edge_wait_s=edge_wait_s,
        core_wait_s=core.wait_s,
        core_rtt_ms=1000 * rtt if rtt is not None else math.inf,
        core_up=core.up,
        edge_model=edge_model,
    )


_CONDITIONS: dict[str, type | tuple[type, ...]] = {
    "core_up": bool,
    "edge_model": (str, list),
    "kind": (str, list),
    "context_over": (int, float),
    "prompt_tokens_over": int,
    "max_tokens_over": int,
    "difficulty_over": (int, float),
    "edge_wait_over_s": (int, float),
    "edge_slower": bool,
    "core_rtt_over_ms": (int, float),
}


@dataclass(frozen=True)
class Rule:
    name: str
    when: dict[str, Any]
    route: str
    degraded: bool = False

    def matches(self, f: Features) -> bool:
        return all(_holds(name, value, f) for name, value in self.when.items())


def _holds(name: str, value: Any, f: Features) -> bool:
    if name == "core_up":
        return f.core_up is value
    if name in ("kind", "edge_model"):
        return getattr(f, name) in ([value] if isinstance(value, str) else value)
    if name == "edge_slower":
        return (f.edge_wait_s > f.core_wait_s + f.core_rtt_ms / 1000) is value
    measured = {
        "context_over": f.context_fraction,
        "prompt_tokens_over": f.prompt_tokens,
        "max_tokens_over": f.max_tokens,
        "difficulty_over": f.difficulty,
        "edge_wait_over_s": f.edge_wait_s,
        "core_rtt_over_ms": f.core_rtt_ms,
    }[name]
    return bool(measured > value)


def parse_rules(raw: Any) -> tuple[Rule, ...]:
    """Rules from their JSON form (a list of {name, when, route, degraded?}); ValueError says what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("the routing table is a non-empty JSON list of rules")
    rules = []
    for i, item in enumerate(raw):
        where = f"rule {i + 1}"
        if not isinstance(item, dict) or set(item) - {"name", "when", "route", "degraded"}:
            raise ValueError(f"{where}: an object of name, when, route and degraded")
        when = item.get("when", {})
        if not isinstance(when, dict):
            raise ValueError(f"{where}: 'when' is an object of conditions")
        for name, value in when.items():
            expected = _CONDITIONS.get(name)
            if expected is None:
                raise ValueError(f"{where}: unknown condition {name!r}; known: {', '.join(_CONDITIONS)}")
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ValueError(f"{where}: {name} takes {expected}, not {value!r}")
        if item.get("route") not in ("edge", "core"):
            raise ValueError(f"{where}: 'route' is 'edge' or 'core'")
        rules.append(Rule(str(item.get("name", where)), when, item["route"], bool(item.get("degraded", False))))
    return tuple(rules)


def load_rules(path: str) -> tuple[Rule, ...]:
    """The table of `--routing FILE`, or the default one for an empty path."""
    if not path:
        return parse_rules(list(DEFAULT_RULES))
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--routing {path}: {exc}") from None
    try:
        return parse_rules(raw)
    except ValueError as exc:
        raise ValueError(f"--routing {path}: {exc}") from None


class CoreView(Protocol):
    """What the policy reads of the core (edge/link.Link behind the edge's bus)."""

    @property
    def up(self) -> bool: ...

    @property
    def rtt_s(self) -> float | None: ...

    @property
    def wait_s(self) -> float: ...


@dataclass(frozen=True)
class Decision:
    model: str
    route: str  # "edge" | "core"
    rule: str = ""  # the rule that chose it ("" for a request that named its model)
    degraded: bool = False


def ready_wait(replicas: list[ReplicaStatus], model: str) -> tuple[float, int]:
    """The least estimated first-token wait of `model`'s ready replicas, and their smallest context (0: none)."""
    ready = [r for r in replicas if r.model == model and r.state is ReplicaState.READY]
    if not ready:
        return 0.0, 0
    return min(r.queue_wait_s for r in ready), min(r.max_model_len for r in ready)
