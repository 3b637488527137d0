"""The realtime protocol without I/O (after python-websockets' protocol.py): client frames in, typed and
validated events out; state changes in, server events (JSON-ready dicts) out. No socket, no gateway, no engine:
tests drive it with strings.

    parser = Parser(server, max_event_bytes)  # server: its models, their context, whether it has documents
    event = parser.parse(text, settings)      # a typed ClientEvent; raises Refused(error, event_id) if invalid
    settings = event.settings                 # SessionUpdate: the session's new frozen SessionSettings (settings.py)
    events.session_event("session.updated", session_id, settings)   # the server event to send (events.py)

Names and shapes follow OpenAI's Realtime API (GA), text modality: sessions are `{"type": "realtime",
"output_modalities": ["text"], ...}`, items are messages with `input_text`/`output_text` parts, and a response
announces its item and content part before the first delta and closes them after the last one. blink's own
events (`input_text.draft`, `context.open`, `response.resume`) and settings (`temperature`, `top_p`, `seed`,
`retrieval`, `cache`) are extensions; audio events get an `audio_not_supported` error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blink.errors import BlinkError, InvalidRequest, RequestTooLarge
from blink.gateway import validation as v
from blink.gateway.realtime.settings import AUDIO_EVENTS, ROLES, TEXT_PARTS, ServerContext, SessionSettings


# items ------------------------------------------------------------------------------------------------
def message_item(item_id: str, role: str, text: str, status: str = "completed") -> dict[str, Any]:
    """A conversation item as the protocol shows it and the session store keeps it."""
    part = "output_text" if role == "assistant" else "input_text"
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": role,
        "status": status,
        "content": [{"type": part, "text": text}],
    }


def item_text(item: dict[str, Any]) -> str:
    return "".join(part["text"] for part in item["content"])


def _message(item: Any, param: str) -> tuple[str, str, str | None]:
    """(role, text, id or None) of a client's message item."""
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{param}' must be an object", param=param)
    if item.get("type", "message") != "message":
        raise InvalidRequest("only items of type 'message' are supported", param=f"{param}.type")
    role = v.get_str(item, "role", required=True, param=f"{param}.role")
    if role not in ROLES:
        raise InvalidRequest(f"'{param}.role' must be one of {list(ROLES)}", param=f"{param}.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"'{param}.content' must be a non-empty list of text parts", param=f"{param}.content")
    for part in content:
        if not (isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str)):
            raise InvalidRequest(
                "each content part must be {type: 'input_text', text: string}", param=f"{param}.content"
            )
    text = "".join(part["text"] for part in content)
    if not text.strip():
        raise InvalidRequest("the message is empty", param=f"{param}.content", code="empty_message")
    return role, text, v.get_str(item, "id", param=f"{param}.id")


# client events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientEvent:
    event_id: str | None


@dataclass(frozen=True)
class SessionUpdate(ClientEvent):
    settings: SessionSettings


@dataclass(frozen=True)
class ItemCreate(ClientEvent):
    role: str
    text: str
    item_id: str | None
    previous_item_id: str | None


@dataclass(frozen=True)
class ItemRetrieve(ClientEvent):
    item_id: str


@dataclass(frozen=True)
class ItemDelete(ClientEvent):
    item_id: str


@dataclass(frozen=True)
class InputItem:
    """An item of response.create's `input`: a message, or a reference to a conversation item (`ref`)."""

    role: str = ""
    text: str = ""
    ref: str | None = None


@dataclass(frozen=True)
class ResponseCreate(ClientEvent):
    settings: SessionSettings
    in_conversation: bool  # False: `conversation: "none"`, an out-of-band response that the conversation never sees
    input: tuple[InputItem, ...] | None  # None: the conversation
    metadata: dict[str, str] | None
    traceparent: str | None  # W3C trace context of the client's action: the trace joins it
    prediction: str | None = None  # blink: the text the answer is expected to copy (as chat completions' field)


@dataclass(frozen=True)
class ResponseCancel(ClientEvent):
    response_id: str | None


@dataclass(frozen=True)
class ResponseResume(ClientEvent):
    response_id: str
    after: int  # the last delta_index the client has; -1: none


@dataclass(frozen=True)
class Draft(ClientEvent):
    text: str
    session_id: str | None


@dataclass(frozen=True)
class ContextOpen(ClientEvent):
    document_ids: tuple[str, ...]
    session_id: str | None


class Refused(Exception):
    """A client event the parser refused: `error` is what to answer, `event_id` the event's own id (if any)."""

    def __init__(self, error: BlinkError, event_id: str | None) -> None:
        super().__init__(error.message)
        self.error, self.event_id = error, event_id


class Parser:
    """Client frames → ClientEvents; a refused frame raises Refused."""

    def __init__(self, server: ServerContext, max_event_bytes: int) -> None:
        self.server = server
        self.max_event_bytes = max_event_bytes

    def parse(self, text: str | None, settings: SessionSettings) -> ClientEvent:
        """`text`: a text frame's payload (None: a binary frame). `settings`: the session's, which a
        session.update or response.create changes."""
        try:
            if text is None:
                raise InvalidRequest("binary frames are not supported; send JSON text frames", code="binary_frame")
            if len(text.encode()) > self.max_event_bytes:  # bytes, not characters: "€" is one character, 3 bytes
                raise RequestTooLarge(f"the event is larger than {self.max_event_bytes} bytes")
            event = v.parse_object(text, "event")
        except BlinkError as exc:
            raise Refused(exc, None) from None
        raw_id = event.get("event_id")
        event_id = raw_id if isinstance(raw_id, str) else None
        kind = event.get("type")
        try:
            if not isinstance(kind, str):
                raise InvalidRequest("the event has no string 'type'", param="type", code="invalid_event")
            if kind in AUDIO_EVENTS:
                raise InvalidRequest(
                    f"{kind} is an audio event; blink serves text only", param="type", code="audio_not_supported"
                )
            parse = _PARSERS.get(kind)
            if parse is None:
                raise InvalidRequest(f"unknown event type {kind!r}", param="type", code="unknown_event_type")
            return parse(self, event, event_id, settings)
        except BlinkError as exc:
            raise Refused(exc, event_id) from None

    def _session_update(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidRequest("'session' must be an object", param="session")
        return SessionUpdate(event_id, settings.merged(session, "session", self.server))

    def _item_create(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        role, text, item_id = _message(event.get("item"), "item")
        previous = v.get_str(event, "previous_item_id", param="previous_item_id")
        return ItemCreate(event_id, role, text, item_id, previous)

    def _item_id(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        item_id = v.get_str(event, "item_id", required=True, param="item_id") or ""
        return (ItemDelete if event["type"] == "conversation.item.delete" else ItemRetrieve)(event_id, item_id)

    def _response_create(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        overrides = event.get("response") or {}
        if not isinstance(overrides, dict):
            raise InvalidRequest("'response' must be an object", param="response")
        conversation = overrides.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise InvalidRequest("'response.conversation' must be 'auto' or 'none'", param="response.conversation")
        raw_input = overrides.get("input")
        if raw_input is not None and not isinstance(raw_input, list):
            raise InvalidRequest("'response.input' must be a list of items", param="response.input")
        metadata = overrides.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= 16 and all(isinstance(x, str) for x in metadata.values())
        ):
            raise InvalidRequest("'response.metadata' must map at most 16 keys to strings", param="response.metadata")
        traceparent = event.get("traceparent")
        return ResponseCreate(
            event_id,
            settings.merged(
                {k: x for k, x in overrides.items() if k not in ("type", "prediction")}, "response", self.server
            ),
            conversation == "auto",
            None
            if raw_input is None
            else tuple(_input_item(x, f"response.input[{i}]") for i, x in enumerate(raw_input)),
            metadata,
            traceparent if isinstance(traceparent, str) else None,
            v.get_prediction(overrides, param="response.prediction"),
        )

    def _response_cancel(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        return ResponseCancel(event_id, v.get_str(event, "response_id", param="response_id"))

    def _response_resume(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        response_id = v.get_str(event, "response_id", required=True, param="response_id") or ""
        after = v.get_number(event, "after", -1, 1 << 31, integer=True, param="after")
        return ResponseResume(event_id, response_id, -1 if after is None else int(after))

    def _draft(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        text = v.get_str(event, "text", required=True, param="text") or ""
        return Draft(event_id, text, v.get_str(event, "session_id", param="session_id"))

    def _context_open(self, event: dict[str, Any], event_id: str | None, settings: SessionSettings) -> ClientEvent:
        ids = event.get("document_ids")
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
            raise InvalidRequest("'document_ids' must be a non-empty list of strings", param="document_ids")
        if not self.server.has_documents:
            raise InvalidRequest("this server has no document store", param="document_ids")
        return ContextOpen(event_id, tuple(dict.fromkeys(ids)), v.get_str(event, "session_id", param="session_id"))


def _input_item(raw: Any, param: str) -> InputItem:
    if isinstance(raw, dict) and raw.get("type") == "item_reference":
        return InputItem(ref=v.get_str(raw, "id", required=True, param=f"{param}.id"))
    role, text, _ = _message(raw, param)
    return InputItem(role, text)


_PARSERS = {
    "session.update": Parser._session_update,
    "conversation.item.create": Parser._item_create,
    "conversation.item.retrieve": Parser._item_id,
    "conversation.item.delete": Parser._item_id,
    "response.create": Parser._response_create,
    "response.cancel": Parser._response_cancel,
    "response.resume": Parser._response_resume,
    "input_text.draft": Parser._draft,
    "context.open": Parser._context_open,
}
