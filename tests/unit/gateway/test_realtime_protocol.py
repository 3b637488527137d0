"""The realtime protocol without a socket: frames in, typed events or errors out; state in, server events out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blink.bus.messages import Finished, FinishStatus
from blink.errors import ModelNotFound
from blink.gateway.realtime import protocol as p
from blink.gateway.realtime.events import ResponseShape, ResponseStatus, response_status
from blink.gateway.realtime.settings import Retrieval, SessionSettings


class Server:
    has_documents = True

    def check_model(self, model: str, param: str = "model") -> None:
        if model != "m":
            raise ModelNotFound(f"no model {model!r}", param=param)

    def max_model_len(self, model: str) -> int:
        return 100


PARSER = p.Parser(Server(), max_event_bytes=1000)
SETTINGS = SessionSettings("m")


def parse(event: dict[str, Any] | str | None) -> p.ClientEvent:
    return PARSER.parse(event if event is None or isinstance(event, str) else json.dumps(event), SETTINGS)


def refused(event: dict[str, Any] | str | None) -> tuple[str, str | None, str | None]:
    """(code, param, event_id) of the error a frame gets."""
    with pytest.raises(p.Refused) as caught:
        parse(event)
    return caught.value.error.code, caught.value.error.param, caught.value.event_id


def test_a_session_update_yields_new_frozen_settings_and_the_ga_session_shape() -> None:
    event = parse(
        {
            "type": "session.update",
            "session": {"type": "realtime", "max_output_tokens": 50, "retrieval": {"top_k": 2}, "cache": False},
        }
    )
    assert isinstance(event, p.SessionUpdate)
    assert event.settings == SessionSettings("m", max_output_tokens=50, retrieval=Retrieval(2), cache=False)
    assert SETTINGS.max_output_tokens is None  # the old settings are unchanged
    wire = event.settings.to_wire()
    assert wire["type"] == "realtime" and wire["output_modalities"] == ["text"] and wire["max_output_tokens"] == 50
    assert SessionSettings.from_stored(wire, SETTINGS) == event.settings  # what the session store keeps reads back


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        (None, "binary_frame", None),
        ("[1]", "invalid_json", None),
        ({"type": 3}, "invalid_event", "type"),
        ({"type": "nope"}, "unknown_event_type", "type"),
        ({"type": "input_audio_buffer.commit"}, "audio_not_supported", "type"),
        ({"type": "session.update", "session": {"type": "transcription"}}, "invalid_request", "session.type"),
        ({"type": "session.update", "session": {"output_modalities": ["audio"]}}, "audio_not_supported", None),
        ({"type": "session.update", "session": {"model": "x"}}, "model_not_found", "session.model"),
        ({"type": "session.update", "session": {"max_output_tokens": 101}}, "invalid_request", None),
        ({"type": "conversation.item.create", "item": {"role": "user", "content": []}}, "invalid_request", None),
        ({"type": "conversation.item.retrieve"}, "invalid_request", "item_id"),
        ({"type": "response.create", "response": {"conversation": "other"}}, "invalid_request", None),
        ({"type": "response.create", "response": {"input": [{"type": "item_reference"}]}}, "invalid_request", None),
        ({"type": "response.create", "response": {"metadata": {"a": 1}}}, "invalid_request", "response.metadata"),
        ({"type": "response.resume", "response_id": "r", "after": "x"}, "invalid_request", "after"),
        ({"type": "x" * 2000}, "request_too_large", None),
    ],
)
def test_an_invalid_frame_is_refused_with_its_code_and_param(event: Any, code: str, param: str | None) -> None:
    got_code, got_param, _ = refused(event)
    assert got_code == code
    if param is not None:
        assert got_param == param


def test_the_error_names_the_event_it_answers() -> None:
    assert refused({"type": "nope", "event_id": "e7"})[2] == "e7"
    assert refused({"type": "conversation.item.delete", "event_id": "e8"})[2] == "e8"


def test_response_create_reads_overrides_its_own_input_and_out_of_band() -> None:
    event = parse(
        {
            "type": "response.create",
            "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            "response": {
                "conversation": "none",
                "temperature": 0,
                "input": [
                    {"type": "item_reference", "id": "item-1"},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                ],
            },
        }
    )
    assert isinstance(event, p.ResponseCreate)
    assert not event.in_conversation and event.settings.temperature == 0 and event.traceparent
    assert event.input == (p.InputItem(ref="item-1"), p.InputItem("user", "Hi"))
    plain = parse({"type": "response.create"})
    assert isinstance(plain, p.ResponseCreate) and plain.in_conversation and plain.input is None


def test_a_response_announces_its_item_and_part_then_closes_them() -> None:
    shape = ResponseShape("resp-1", "item-9", "sess-1", SETTINGS, True, "item-8", None)
    opening = shape.opening(rate_limits=[])
    assert [e["type"] for e in opening] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert opening[2]["previous_item_id"] == "item-8" and opening[1]["item"]["status"] == "in_progress"
    assert shape.delta(3, "lo")["delta_index"] == 3
    status, details = response_status(Finished("resp-1", FinishStatus.LENGTH), None)
    item, closing = shape.closing(status, details, "Hello", {"usage": {}})
    assert status is ResponseStatus.INCOMPLETE and item["status"] == "incomplete"
    assert [e["type"] for e in closing][-2:] == ["conversation.item.done", "response.done"]
    done = closing[-1]["response"]
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["output"] == [item] and done["conversation_id"] == "sess-1"
    out_of_band = ResponseShape("resp-2", "item-10", "sess-1", SETTINGS, False, None, {"k": "v"})
    assert not any(e["type"].startswith("conversation.") for e in out_of_band.opening(None))
    cancelled = response_status(Finished("resp-2", FinishStatus.CANCELLED), "client")
    assert cancelled == (ResponseStatus.CANCELLED, {"type": "cancelled", "reason": "client_cancelled"})
