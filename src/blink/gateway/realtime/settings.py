"""A realtime session's settings: frozen, validated from session.update's `session` (or response.create's
`response`), shown as OpenAI's Realtime GA session object (`{"type": "realtime", "output_modalities": ["text"],
...}`) with blink's extensions (`temperature`, `top_p`, `seed`, `retrieval`, `cache`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from blink.errors import InvalidRequest
from blink.gateway import validation as v

DEFAULT_TEMPERATURE = 1.0  # as on HTTP (OpenAI's chat default)
TEXT_PARTS = ("input_text", "text", "output_text")  # a tuple: `x in` must not hash client JSON (a list)
ROLES = ("system", "user", "assistant")
MAX_TOP_K = 20
# OpenAI's audio events: understood, refused with a typed error (blink serves text)
AUDIO_EVENTS = (
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "output_audio_buffer.clear",
    "conversation.item.truncate",
)


class ServerContext(Protocol):
    """What validation needs to know of the server."""

    @property
    def has_documents(self) -> bool: ...

    def check_model(self, model: str, param: str = "model") -> None:
        """NotFound unless the server serves `model`."""
        ...

    def max_model_len(self, model: str) -> int: ...


@dataclass(frozen=True)
class Retrieval:
    top_k: int = 4
    document_ids: tuple[str, ...] | None = None  # None: the documents the user opened, else all of the tenant's


@dataclass(frozen=True)
class SessionSettings:
    model: str
    instructions: str | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    seed: int | None = None
    max_output_tokens: int | None = None  # None: "inf" (up to the model's context)
    retrieval: Retrieval | None = None
    cache: bool = True  # answer from the semantic cache when it can

    def to_wire(self) -> dict[str, Any]:
        """The settings as sessions and responses show them (and the session store keeps them)."""
        retrieval = self.retrieval
        return {
            "type": "realtime",
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": self.instructions,
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "retrieval": None
            if retrieval is None
            else {"top_k": retrieval.top_k, "document_ids": list(retrieval.document_ids or []) or None},
            "cache": self.cache,
        }

    @classmethod
    def from_stored(cls, stored: dict[str, Any], default: SessionSettings) -> SessionSettings:
        """Settings the session store kept (`to_wire`'s shape); what is missing keeps `default`'s value."""
        retrieval = stored.get("retrieval")
        tokens = stored.get("max_output_tokens", "inf")
        return dataclasses.replace(
            default,
            **{k: stored[k] for k in ("model", "instructions", "temperature", "top_p", "seed", "cache") if k in stored},
            max_output_tokens=None if tokens == "inf" else int(tokens),
            retrieval=None
            if not retrieval
            else Retrieval(retrieval["top_k"], tuple(retrieval["document_ids"] or ()) or None),
        )

    def merged(self, obj: dict[str, Any], where: str, server: ServerContext) -> SessionSettings:
        """These settings with the ones present in `obj` (session.update's `session`, response.create's
        `response`), validated; `max_output_tokens` against the model they will run with."""
        kind = obj.get("type", "realtime")
        if kind != "realtime":
            raise InvalidRequest(
                f"'{where}.type' must be 'realtime' (blink has no transcription sessions)", param=f"{where}.type"
            )
        modalities = obj.get("output_modalities", obj.get("modalities"))
        if modalities is not None and modalities != ["text"]:
            raise InvalidRequest(
                f"'{where}.output_modalities' must be ['text']: blink serves text, not audio",
                param=f"{where}.output_modalities",
                code="audio_not_supported",
            )
        out: dict[str, Any] = {}
        model = v.get_str(obj, "model", param=f"{where}.model")
        if model is not None:
            server.check_model(model, param=f"{where}.model")
            out["model"] = model
        if "instructions" in obj:
            out["instructions"] = v.get_str(obj, "instructions", param=f"{where}.instructions")
        for key, lo, hi, integer in (
            ("temperature", 0, 2, False),
            ("top_p", 1e-9, 1, False),
            ("seed", -(1 << 63), (1 << 63) - 1, True),
        ):
            value = v.get_number(obj, key, lo, hi, integer=integer, param=f"{where}.{key}")
            if value is not None:
                out[key] = value
        for key in ("max_output_tokens", "max_response_output_tokens"):  # GA name, then the beta one
            if key in obj:
                value = obj[key]
                if value != "inf":
                    limit = server.max_model_len(out.get("model", self.model))
                    value = v.get_number(obj, key, 1, limit, integer=True, param=f"{where}.{key}")
                out["max_output_tokens"] = None if value == "inf" else value
                break
        if "retrieval" in obj:
            out["retrieval"] = _retrieval(obj["retrieval"], f"{where}.retrieval", server)
        if "cache" in obj:
            if not isinstance(obj["cache"], bool):
                raise InvalidRequest(f"'{where}.cache' must be a boolean", param=f"{where}.cache")
            out["cache"] = obj["cache"]
        return dataclasses.replace(self, **out)


def _retrieval(raw: Any, param: str, server: ServerContext) -> Retrieval | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{param}' must be an object or null", param=param)
    if not server.has_documents:
        raise InvalidRequest("this server has no document store", param=param)
    top_k = v.get_number(raw, "top_k", 1, MAX_TOP_K, integer=True, param=f"{param}.top_k")
    ids = raw.get("document_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise InvalidRequest(f"'{param}.document_ids' must be a list of strings", param=f"{param}.document_ids")
    return Retrieval(int(top_k or 4), tuple(ids) if ids else None)
