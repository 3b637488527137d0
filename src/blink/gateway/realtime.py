"""WebSocket /v1/realtime: the realtime event protocol (names follow the OpenAI Realtime API).

client → server: session.update, conversation.item.create, response.create, response.cancel
server → client: session.created, session.updated, conversation.item.created, response.created,
                 response.output_text.delta, response.output_text.done, response.done, error

A session holds its settings and conversation; one response runs at a time and the reader keeps reading while
it streams, so `response.cancel` takes effect within one engine step. An invalid event gets an `error` event
(with the offending `event_id`) and the session stays open.

Response lifecycle: in_progress ──▶ completed | cancelled | incomplete | failed (each final).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from blink.bus.messages import FinishStatus, GenerateRequest, Sampling
from blink.errors import BlinkError, InvalidRequest, RequestTooLarge, from_wire
from blink.gateway import validation as v
from blink.gateway.service import Gateway, Generation
from blink.gateway.wire import error_event

log = logging.getLogger("blink.gateway.realtime")

DEFAULT_TEMPERATURE = 1.0  # as on HTTP (OpenAI's chat default)
TEXT_PARTS = {"input_text", "text", "output_text"}
ROLES = {"system", "user", "assistant"}


class ResponseStatus(enum.Enum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


class RealtimeSession:
    def __init__(self, ws: WebSocket, gateway: Gateway) -> None:
        self.ws = ws
        self.gateway = gateway
        self.id = gateway.new_id("sess")
        self.settings: dict[str, Any] = {
            "model": gateway.default_model,
            "instructions": None,
            "temperature": DEFAULT_TEMPERATURE,
            "top_p": 1.0,
            "seed": None,
            "max_output_tokens": "inf",
        }
        self.items: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._generation: Generation | None = None
        self._cancel_requested = False
        self._send_lock = asyncio.Lock()
        self._handlers = {
            "session.update": self._session_update,
            "conversation.item.create": self._item_create,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }

    async def send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    def _session(self) -> dict[str, Any]:
        return {"id": self.id, "object": "realtime.session", **self.settings}

    async def run(self) -> None:
        await self.ws.accept()
        await self.send({"type": "session.created", "session": self._session()})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._on_message(message)
        except WebSocketDisconnect:
            return
        finally:
            await self._abandon()

    async def _on_message(self, message: Mapping[str, Any]) -> None:
        event_id = None
        try:
            text = message.get("text")
            if text is None:
                raise InvalidRequest("binary frames are not supported; send JSON text frames", code="binary_frame")
            limit = self.gateway.config.max_request_bytes
            if len(text.encode()) > limit:  # bytes, not characters: "€" is one character and three bytes
                raise RequestTooLarge(f"the event is larger than {limit} bytes")
            event = v.parse_object(text, "event")
            raw_id = event.get("event_id")
            event_id = raw_id if isinstance(raw_id, str) else None
            kind = event.get("type")
            if not isinstance(kind, str):
                raise InvalidRequest("the event has no string 'type'", param="type", code="invalid_event")
            handler = self._handlers.get(kind)
            if handler is None:
                raise InvalidRequest(f"unknown event type {kind!r}", param="type", code="unknown_event_type")
            await handler(event)
        except BlinkError as exc:
            await self.send(error_event(exc, event_id))

    # client events ------------------------------------------------------------------------------------
    async def _session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidRequest("'session' must be an object", param="session")
        self.settings.update(self._settings_from(session, "session"))
        await self.send({"type": "session.updated", "session": self._session()})

    def _settings_from(self, obj: dict[str, Any], where: str) -> dict[str, Any]:
        """Validated settings present in `obj` (session.update's session or response.create's response).
        `max_output_tokens` is checked against the model they will run with: `obj`'s `model` if it names one."""
        out: dict[str, Any] = {}
        model = v.get_str(obj, "model", param=f"{where}.model")
        if model is not None:
            self.gateway.check_model(model, param=f"{where}.model")
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
        if "max_output_tokens" in obj:
            value = obj["max_output_tokens"]
            if value != "inf":
                limit = self.gateway.max_model_len(out.get("model", self.settings["model"]))
                value = v.get_number(
                    obj, "max_output_tokens", 1, limit, integer=True, param=f"{where}.max_output_tokens"
                )
            out["max_output_tokens"] = value
        return out

    async def _item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise InvalidRequest("'item' must be an object", param="item")
        if item.get("type", "message") != "message":
            raise InvalidRequest("only items of type 'message' are supported", param="item.type")
        role = v.get_str(item, "role", required=True, param="item.role")
        if role not in ROLES:
            raise InvalidRequest(f"'item.role' must be one of {sorted(ROLES)}", param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise InvalidRequest("'item.content' must be a non-empty list of text parts", param="item.content")
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str)):
                raise InvalidRequest(
                    "each content part must be {type: 'input_text', text: string}", param="item.content"
                )
            texts.append(part["text"])
        if not "".join(texts).strip():
            raise InvalidRequest("the message is empty", param="item.content", code="empty_message")
        item_id = v.get_str(item, "id", param="item.id") or self.gateway.new_id("item")
        stored = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": role,
            "status": "completed",
            "content": [{"type": "input_text" if role != "assistant" else "output_text", "text": "".join(texts)}],
        }
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(stored)
        await self.send({"type": "conversation.item.created", "previous_item_id": previous, "item": stored})

    async def _response_create(self, event: dict[str, Any]) -> None:
        if self._task is not None and not self._task.done():
            raise InvalidRequest(
                "a response is already in progress; cancel it or wait for response.done",
                code="conversation_already_has_active_response",
            )
        overrides = event.get("response") or {}
        if not isinstance(overrides, dict):
            raise InvalidRequest("'response' must be an object", param="response")
        settings = {**self.settings, **self._settings_from(overrides, "response")}
        if not any(item["role"] == "user" for item in self.items):
            raise InvalidRequest(
                "the conversation has no user message yet; send conversation.item.create first",
                code="empty_conversation",
            )
        messages = [{"role": i["role"], "content": i["content"][0]["text"]} for i in self.items]
        if settings["instructions"]:
            messages.insert(0, {"role": "system", "content": settings["instructions"]})
        max_tokens = settings["max_output_tokens"]
        sampling = Sampling(
            max_tokens=None if max_tokens == "inf" else max_tokens,
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            seed=settings["seed"],
        )
        request = GenerateRequest(self.gateway.new_id("resp"), settings["model"], sampling, messages=tuple(messages))
        self._cancel_requested = False
        self._task = asyncio.create_task(self._respond(request, time.monotonic(), event.get("event_id")))

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        if self._task is None or self._task.done():
            raise InvalidRequest("there is no response in progress", code="response_cancel_not_active")
        self._cancel_requested = True
        if self._generation is not None:
            await self._generation.cancel("client")

    # the response -------------------------------------------------------------------------------------
    async def _respond(self, request: GenerateRequest, started: float, event_id: Any) -> None:
        try:
            generation = await self.gateway.generate(request, started=started)
        except BlinkError as exc:
            await self.send(error_event(exc, event_id if isinstance(event_id, str) else None))
            return
        self._generation = generation
        if self._cancel_requested:
            await generation.cancel("client")
        response_id, item_id = request.request_id, self.gateway.new_id("item")
        try:
            await self.send(
                {
                    "type": "response.created",
                    "response": {
                        "id": response_id,
                        "object": "realtime.response",
                        "status": "in_progress",
                        "output": [],
                    },
                }
            )
            async for delta in generation.deltas():
                await self.send(
                    {
                        "type": "response.output_text.delta",
                        "response_id": response_id,
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": delta,
                    }
                )
            await self._finish(generation, response_id, item_id)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # the socket closed under us
            log.debug("session %s: response %s not delivered: %s", self.id, response_id, exc)
        finally:
            self._generation = None
            await generation.close()

    async def _finish(self, generation: Generation, response_id: str, item_id: str) -> None:
        status, details = _status(generation)
        text = generation.text
        if status is not ResponseStatus.FAILED:
            await self.send(
                {
                    "type": "response.output_text.done",
                    "response_id": response_id,
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                }
            )
        output = []
        if text:
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "role": "assistant",
                "status": "completed" if status is ResponseStatus.COMPLETED else "incomplete",
                "content": [{"type": "output_text", "text": text}],
            }
            self.items.append(item)
            output.append(item)
        fin = generation.finished
        prompt = (fin.prompt_tokens if fin else 0) or generation.prompt_tokens
        completion = fin.completion_tokens if fin else 0
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": response_id,
                    "object": "realtime.response",
                    "status": status.value,
                    "status_details": details,
                    "output": output,
                    "usage": {
                        "input_tokens": prompt,
                        "output_tokens": completion,
                        "total_tokens": prompt + completion,
                        "input_token_details": {"cached_tokens": fin.cached_tokens if fin else 0},
                    },
                    "timings": generation.timings(),
                },
            }
        )

    async def _abandon(self) -> None:
        """The client left: cancel the running response (the replica frees its sequence)."""
        task, generation = self._task, self._generation
        if generation is not None:
            await generation.close()
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _status(generation: Generation) -> tuple[ResponseStatus, dict[str, Any] | None]:
    fin = generation.finished
    assert fin is not None
    if fin.status is FinishStatus.STOP:
        return ResponseStatus.COMPLETED, None
    if fin.status is FinishStatus.LENGTH:
        return ResponseStatus.INCOMPLETE, {"type": "incomplete", "reason": "max_output_tokens"}
    if fin.status is FinishStatus.CANCELLED:
        if generation.cancel_reason == "client":
            return ResponseStatus.CANCELLED, {"type": "cancelled", "reason": "client_cancelled"}
        # a cancel the client did not ask for: the server (or the replica serving the response) is stopping
        return ResponseStatus.INCOMPLETE, {"type": "incomplete", "reason": "server_shutdown"}
    error = from_wire(fin.error_code or "", fin.error_message or "", fin.error_param)
    return ResponseStatus.FAILED, {"type": "failed", "error": error.to_dict()}


async def realtime_endpoint(ws: WebSocket) -> None:
    gateway: Gateway = ws.app.state.gateway
    await RealtimeSession(ws, gateway).run()
