"""The server events of the realtime protocol, as JSON-ready dicts (no I/O): a session's, an item's, and a
response's lifecycle (response.created → output item and content part added → output_text deltas → their done
events → response.done), in OpenAI's Realtime GA shapes."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Any

from blink.bus.messages import Finished, FinishStatus
from blink.errors import from_wire
from blink.gateway.realtime.protocol import message_item
from blink.gateway.realtime.settings import SessionSettings


# server events ----------------------------------------------------------------------------------------
def stamped(event: dict[str, Any]) -> dict[str, Any]:
    """`event` with a server event id, as every server event carries one."""
    return {"event_id": f"event_{secrets.token_hex(8)}", **event}


def session_event(kind: str, session_id: str, settings: SessionSettings) -> dict[str, Any]:
    """session.created or session.updated."""
    return {"type": kind, "session": {"id": session_id, "object": "realtime.session", **settings.to_wire()}}


def item_events(item: dict[str, Any], previous_item_id: str | None) -> list[dict[str, Any]]:
    """A whole item joining the conversation: conversation.item.added, then conversation.item.done."""
    return [
        {"type": "conversation.item.added", "previous_item_id": previous_item_id, "item": item},
        {"type": "conversation.item.done", "previous_item_id": previous_item_id, "item": item},
    ]


class ResponseStatus(enum.Enum):
    """in_progress ──▶ completed | cancelled | incomplete | failed (each final)."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


def response_status(fin: Finished, cancel_reason: str | None) -> tuple[ResponseStatus, dict[str, Any] | None]:
    """A finished generation's response status and status_details."""
    if fin.status is FinishStatus.STOP:
        return ResponseStatus.COMPLETED, None
    if fin.status is FinishStatus.LENGTH:
        return ResponseStatus.INCOMPLETE, {"type": "incomplete", "reason": "max_output_tokens"}
    if fin.status is FinishStatus.CANCELLED:
        if cancel_reason == "client":
            return ResponseStatus.CANCELLED, {"type": "cancelled", "reason": "client_cancelled"}
        # a cancel the client did not ask for: the server (or the replica serving the response) is stopping
        return ResponseStatus.INCOMPLETE, {"type": "incomplete", "reason": "server_shutdown"}
    error = from_wire(fin.error_code or "", fin.error_message or "", fin.error_param)
    return ResponseStatus.FAILED, {"type": "failed", "error": error.to_dict()}


@dataclass(frozen=True)
class ResponseShape:
    """What a response's events repeat: its ids, where its item goes, and the settings it runs with."""

    response_id: str
    item_id: str
    session_id: str
    settings: SessionSettings
    in_conversation: bool
    previous_item_id: str | None
    metadata: dict[str, str] | None

    def response(self, status: ResponseStatus, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        tokens = self.settings.max_output_tokens
        return {
            "id": self.response_id,
            "object": "realtime.response",
            "status": status.value,
            "output": output,
            "conversation_id": self.session_id if self.in_conversation else None,
            "output_modalities": ["text"],
            "max_output_tokens": "inf" if tokens is None else tokens,
            "metadata": self.metadata,
            **extra,
        }

    def _where(self, *, item: bool = True) -> dict[str, Any]:
        """Where an event's subject is: the response's output 0, its content part 0 (`item`: an event of a part)."""
        if not item:
            return {"response_id": self.response_id, "output_index": 0}
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening(self, rate_limits: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """response.created, rate_limits.updated (when the tenant has limits), then the output item and its
        content part as added (and, in the conversation, conversation.item.added)."""
        item = {**message_item(self.item_id, "assistant", "", "in_progress"), "content": []}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": self.response(ResponseStatus.IN_PROGRESS, [])}
        ]
        if rate_limits:
            events.append({"type": "rate_limits.updated", "rate_limits": rate_limits})
        events.append({"type": "response.output_item.added", **self._where(item=False), "item": item})
        if self.in_conversation:
            events.append({"type": "conversation.item.added", "previous_item_id": self.previous_item_id, "item": item})
        events.append(
            {"type": "response.content_part.added", **self._where(), "part": {"type": "output_text", "text": ""}}
        )
        return events

    def delta(self, index: int, delta: str) -> dict[str, Any]:
        return {"type": "response.output_text.delta", **self._where(), "delta": delta, "delta_index": index}

    def closing(
        self, status: ResponseStatus, details: dict[str, Any] | None, text: str, extra: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the output item, the closing events): output_text.done, content_part.done, output_item.done
        (conversation.item.done in the conversation), response.done carrying `extra` (usage, timings, ...)."""
        part = {"type": "output_text", "text": text}
        done = "completed" if status is ResponseStatus.COMPLETED else "incomplete"
        item = message_item(self.item_id, "assistant", text, done)
        events = [
            {"type": "response.output_text.done", **self._where(), "text": text},
            {"type": "response.content_part.done", **self._where(), "part": part},
            {"type": "response.output_item.done", **self._where(item=False), "item": item},
        ]
        if self.in_conversation:
            events.append({"type": "conversation.item.done", "previous_item_id": self.previous_item_id, "item": item})
        response = self.response(status, [item] if text or status is not ResponseStatus.FAILED else [], **extra)
        events.append({"type": "response.done", "response": {**response, "status_details": details}})
        return item, events


def usage(prompt: int, completion: int, cached: int, prediction: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """The Realtime API's usage; `prediction`: (accepted, rejected) tokens of response.create's prediction, in
    output_token_details under chat completions' names."""
    accepted, rejected = prediction
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_token_details": {"cached_tokens": cached, "text_tokens": prompt, "audio_tokens": 0},
        "output_token_details": {
            "text_tokens": completion,
            "audio_tokens": 0,
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": rejected,
        },
    }
