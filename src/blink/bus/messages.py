"""Typed, versioned bus messages. Every message carries `request_id` (or `replica_id`) and W3C trace context.

    gateway ──GenerateRequest──▶ pool of replicas     gateway ──Cancel──▶ every replica of the pool
    gateway ◀──Accepted, TokenEvent*, Finished── the replica that took the request
    gateway ◀──ReplicaStatus── every replica (heartbeat)

`to_dict` / `from_dict` give the JSON-safe form a network transport sends; the memory transport passes the
objects themselves. A message of an unknown kind or a newer major version raises ValueError.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

VERSION = 1


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past the end-of-text token (benchmarks; as in vLLM)


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of `messages` (chat: [{role, content}]) and `prompt` (plain completion) is set."""

    kind: ClassVar[str] = "generate"
    request_id: str
    model: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    deadline: float | None = None  # unix time after which nobody waits for the answer
    traceparent: str | None = None
    created: float = field(default_factory=time.time)
    session_id: str | None = None  # the realtime session it comes from (pre-loading bookkeeping, affinity)
    priority: int = 0  # 0: live; above 0: background work that never delays live tokens
    prefill_only: bool = False  # pre-loading: fill the prefix cache with the prompt's K/V; no tokens, Finished
    open_last: bool = False  # chat: the last message is still being typed; the prompt ends inside it
    affinity: str | None = None  # names the prompt's prefix (a session, a system prompt): replicas report those held
    submitted: float | None = None  # unix time the gateway submitted it (set when tracing: the bus.publish span)
    # the tenant it belongs to: its prefix-cache partition and its share of the batch; None: an open server's
    # single tenant
    tenant: str | None = None
    prediction: str | None = None  # the text the answer is expected to copy (OpenAI Predicted Outputs)
    # pre-decode: decode this many tokens at background priority, then hold them (and the KV) for a request that
    # adopts it; its Finished comes when it has them (0: an ordinary request)
    predecode: int = 0
    # the pre-decode (its request id) this request asks to go on from: taken when the replica holds it and it has
    # the same tenant, session, prompt and sampling (max_tokens aside); otherwise the request runs as usual
    adopt: str | None = None
    v: int = VERSION


@dataclass(frozen=True)
class Cancel:
    kind: ClassVar[str] = "cancel"
    request_id: str
    model: str
    traceparent: str | None = None
    v: int = VERSION


@dataclass(frozen=True)
class Accepted:
    """The replica took the request and tokenized it; the first token follows."""

    kind: ClassVar[str] = "accepted"
    request_id: str
    replica_id: str
    prompt_tokens: int
    v: int = VERSION


@dataclass(frozen=True)
class TokenEvent:
    kind: ClassVar[str] = "token"
    request_id: str
    index: int  # of this event in the response: 0, 1, 2, ... (a resume point)
    text: str  # complete UTF-8 characters only
    completion_tokens: int  # tokens generated so far, this event's included
    v: int = VERSION


class FinishStatus(enum.Enum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens or context reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[str] = "finished"
    request_id: str
    status: FinishStatus
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prediction_accepted: int = 0  # the request's prediction's tokens verified and kept, and verified and rejected
    prediction_rejected: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # queue_ms, prefill_ms, decode_ms
    error_code: str | None = None
    error_message: str | None = None
    error_param: str | None = None
    created: float = field(default_factory=time.time, compare=False)  # unix time the replica ended it
    v: int = VERSION


class ReplicaState(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ReplicaStatus:
    kind: ClassVar[str] = "replica_status"
    replica_id: str
    model: str
    state: ReplicaState
    running: int = 0
    waiting: int = 0
    max_model_len: int = 0
    kv_blocks_in_use: int = 0  # held by running or waiting sequences (cached-only blocks are free to evict)
    kv_blocks_total: int = 0
    background_prefill_tokens: int = 0  # prompt tokens computed for pre-loads since start
    background_tokens_used: int = 0  # of those, tokens a live request then found in the cache
    interrupted_steps: int = 0  # engine steps called off for another tenant's newcomer since start
    parked: int = 0  # pre-decodes holding their first tokens for a submit (worker/predecode.py)
    speculative: str = "off"  # the replica's --speculative
    spec_proposed: int = 0  # guessed tokens verified since start, and of those accepted
    spec_accepted: int = 0
    queue_wait_s: float = 0.0  # estimated wait for a new live request's first token (worker/load.py)
    prefixes: tuple[str, ...] = ()  # affinity keys of requests whose prompt's first blocks it holds in its cache
    architecture: str = ""  # the model's family (llama, qwen2, qwen3, gemma3, phi3)
    weights_mib: float = 0.0  # the model's weights (and buffers) in memory, in their serving format
    kv_cache_mib: float = 0.0  # the paged KV cache's size (--kv-cache-mb, rounded down to whole blocks)
    sent: float = field(default_factory=time.time)
    v: int = VERSION


ResponseEvent = Accepted | TokenEvent | Finished
WorkMessage = GenerateRequest | Cancel
Message = GenerateRequest | Cancel | Accepted | TokenEvent | Finished | ReplicaStatus

_KINDS: dict[str, type[Any]] = {
    c.kind: c for c in (GenerateRequest, Cancel, Accepted, TokenEvent, Finished, ReplicaStatus)
}


def to_dict(msg: Message) -> dict[str, Any]:
    out = dataclasses.asdict(msg)
    out["kind"] = msg.kind
    for key, value in out.items():
        if isinstance(value, enum.Enum):
            out[key] = value.value
    return out


def from_dict(raw: dict[str, Any]) -> Message:
    raw = dict(raw)
    cls = _KINDS.get(str(raw.pop("kind", "")))
    if cls is None:
        raise ValueError(f"unknown message kind in {sorted(raw)}")
    if int(raw.get("v", VERSION)) > VERSION:
        raise ValueError(f"message version {raw['v']} is newer than this build's {VERSION}")
    if cls is GenerateRequest:
        raw["sampling"] = Sampling(**{**raw["sampling"], "stop": tuple(raw["sampling"].get("stop", ()))})
        if raw.get("messages") is not None:
            raw["messages"] = tuple(raw["messages"])
    elif cls is Finished:
        raw["status"] = FinishStatus(raw["status"])
    elif cls is ReplicaStatus:
        raw["state"] = ReplicaState(raw["state"])
        raw["prefixes"] = tuple(raw.get("prefixes", ()))
    msg: Message = cls(**raw)
    return msg
