"""WebSocket /v1/realtime: the realtime event protocol (names follow the OpenAI Realtime API).

client → server: session.update, conversation.item.create, response.create, response.cancel, blink's
                 pre-loading events input_text.draft {text} and context.open {document_ids}, and
                 response.resume {response_id, after}
server → client: session.created, session.updated, conversation.item.created, response.created,
                 response.output_text.delta, response.output_text.done, response.done, error

Sessions outlive connections (gateway/sessions.py: in memory, or in Redis with --redis): connecting to
`/v1/realtime?session_id=<id>` continues that session (its settings and conversation) with the same API key, on
this gateway or another on the same Redis. A response runs detached from the connection (gateway/resume.py):
each `response.output_text.delta` carries `delta_index` (0, 1, ...), and a client that lost its connection sends
`response.resume {response_id, after: <last delta_index it has, -1 for none>}` on a new one to get the rest, then
response.done, with nothing lost or repeated (within --resume-window-s, on the gateway that runs it).

Pre-loading (preload/planner.py): each draft re-targets the session's PrefillPlanner, which prefills the
predicted prompt on the replica at low priority; at response.create the planner stops and the prompt finds those
blocks in the prefix cache. With `retrieval` on (session.update), the prompt is built in a stable order:
system instructions + retrieved chunks (ordered by document and position, not score) + history + the user's
message; the pre-load retrieves for the predicted query, and the submit retrieves again for the final one (the
KV is reused only if the chunks are the same: the prefix cache compares tokens, never assumes).

A session holds its settings and conversation; one response runs at a time and the reader keeps reading while
it streams, so `response.cancel` takes effect within one engine step. An invalid event gets an `error` event
(with the offending `event_id`) and the session stays open.

Response lifecycle: in_progress ──▶ completed | cancelled | incomplete | failed (each final).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from blink.bus.messages import FinishStatus, GenerateRequest, Sampling
from blink.errors import BlinkError, InvalidRequest, NotFound, RateLimited, RequestTooLarge, from_wire
from blink.gateway import validation as v
from blink.gateway.auth import tenant_of
from blink.gateway.limits import Coalescer
from blink.gateway.resume import ResponseLog
from blink.gateway.service import Gateway, Generation
from blink.gateway.sessions import SessionRecord
from blink.gateway.wire import error_event, error_response, ws_api_key
from blink.preload.planner import Messages, PrefillPlanner, PreloadDeferred, Target
from blink.preload.store import ContextStore, ScoredChunk, context_block

log = logging.getLogger("blink.gateway.realtime")

DEFAULT_TEMPERATURE = 1.0  # as on HTTP (OpenAI's chat default)
TEXT_PARTS = ("input_text", "text", "output_text")  # a tuple: `x in` must not hash client JSON (a list)
ROLES = {"system", "user", "assistant"}
MAX_TOP_K = 20
PRELOAD_PRIORITY = 1  # background: below every live request


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
            "retrieval": None,  # or {"top_k": int, "document_ids": [str] | None}
            "cache": gateway.cache is not None,  # answer from the semantic cache when it can
        }
        self.tenant = tenant_of(ws.scope)  # authenticated at the handshake (gateway/auth.py)
        _, self._subprotocol = ws_api_key(ws.headers, list(ws.scope.get("subprotocols") or []))
        self.items: list[dict[str, Any]] = []
        self.open_documents: tuple[str, ...] = ()
        self.planner = (
            PrefillPlanner(self._start_preload, context=self._preload_context) if gateway.config.preload else None
        )
        self._drafts = Coalescer(self.tenant.limits.drafts_per_second)
        self._task: asyncio.Task[None] | None = None
        self._generation: Generation | None = None
        self._cancel_requested = False
        self._send_lock = asyncio.Lock()
        self._handlers = {
            "session.update": self._session_update,
            "conversation.item.create": self._item_create,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "response.resume": self._response_resume,
            "input_text.draft": self._draft,
            "context.open": self._context_open,
        }

    async def send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    def _documents(self) -> ContextStore:
        assert self.gateway.store is not None
        limits = self.tenant.limits
        return self.gateway.store.of(self.tenant.name, limits.max_documents, limits.max_document_bytes)

    def _session(self) -> dict[str, Any]:
        return {"id": self.id, "object": "realtime.session", **self.settings}

    async def _open(self) -> bool:
        """Continue the session the URL names (?session_id=) or create a new one; False (after an error event)
        when the named session is not this key's or the store is unreachable."""
        store = self.gateway.session_store
        tenant = self.tenant.name
        wanted = self.ws.query_params.get("session_id")
        try:
            if wanted is None:
                await store.create(self.id, SessionRecord(tenant, dict(self.settings)))
                return True
            record = await store.load(wanted, tenant)
        except BlinkError as exc:
            await self.send(error_event(exc))
            return False
        if record is None:
            message = f"no session {wanted!r} for this API key (unknown, expired, or another key's)"
            await self.send(error_event(NotFound(message, param="session_id", code="session_not_found")))
            return False
        self.id = wanted
        self.settings.update(record.settings)
        self.items = record.items
        return True

    async def run(self) -> None:
        try:
            self.gateway.limits.open_session(self.tenant)
        except RateLimited as exc:
            await refuse(self.ws, exc)
            return
        try:
            await self._run()
        finally:
            self.gateway.limits.close_session(self.tenant)
            self._drafts.close()

    async def _run(self) -> None:
        await self.ws.accept(subprotocol=self._subprotocol)
        if not await self._open():
            await self.ws.close(1008)
            return
        self.gateway.sessions[self.id] = self
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
            if self.gateway.sessions.get(self.id) is self:
                del self.gateway.sessions[self.id]
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
        except Exception:  # a bug in one handler answers that event with an error; the session stays open
            log.exception("session %s: event failed", self.id)
            await self.send(error_event(BlinkError("internal error handling the event"), event_id))

    # client events ------------------------------------------------------------------------------------
    async def _session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidRequest("'session' must be an object", param="session")
        self.settings.update(self._settings_from(session, "session"))
        await self.gateway.session_store.save_settings(self.id, self.settings)
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
        if "retrieval" in obj:
            out["retrieval"] = self._retrieval_from(obj["retrieval"], f"{where}.retrieval")
        if "cache" in obj:
            if not isinstance(obj["cache"], bool):
                raise InvalidRequest(f"'{where}.cache' must be a boolean", param=f"{where}.cache")
            out["cache"] = obj["cache"]
        return out

    def _retrieval_from(self, raw: Any, param: str) -> dict[str, Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise InvalidRequest(f"'{param}' must be an object or null", param=param)
        if self.gateway.store is None:
            raise InvalidRequest("this server has no document store", param=param)
        top_k = v.get_number(raw, "top_k", 1, MAX_TOP_K, integer=True, param=f"{param}.top_k")
        ids = raw.get("document_ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise InvalidRequest(f"'{param}.document_ids' must be a list of strings", param=f"{param}.document_ids")
        return {"top_k": int(top_k or 4), "document_ids": ids}

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
        self._check_room(len("".join(texts).encode()))
        stored = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": role,
            "status": "completed",
            "content": [{"type": "input_text" if role != "assistant" else "output_text", "text": "".join(texts)}],
        }
        previous = self.items[-1]["id"] if self.items else None
        await self.gateway.session_store.append_item(self.id, stored)
        self.items.append(stored)
        await self.send({"type": "conversation.item.created", "previous_item_id": previous, "item": stored})

    def _check_room(self, size: int) -> None:
        """Raise ConversationFull if an item of `size` bytes would pass the tenant's limits for one session."""
        limits = self.tenant.limits
        held = sum(len(part["text"].encode()) for item in self.items for part in item["content"])
        if limits.max_session_items and len(self.items) >= limits.max_session_items:
            raise InvalidRequest(
                f"the conversation holds {len(self.items)} items, this key's limit; start a new session",
                code="conversation_full",
            )
        if limits.max_session_bytes and held + size > limits.max_session_bytes:
            raise InvalidRequest(
                f"the conversation would hold {held + size} bytes of text, over this key's {limits.max_session_bytes};"
                " start a new session",
                code="conversation_full",
            )

    async def _draft(self, event: dict[str, Any]) -> None:
        """input_text.draft {text}: the user's unsent text. Every keystroke may send one; the planner coalesces."""
        self._check_session(event)
        text = v.get_str(event, "text", required=True, param="text")
        assert text is not None
        if self.planner is not None and (self._task is None or self._task.done()):
            # over the tenant's drafts_per_second, the latest draft waits (one at most) and the others are dropped
            self._drafts.offer(functools.partial(self._plan, text))

    def _plan(self, text: str) -> None:
        if self.planner is not None and (self._task is None or self._task.done()):
            self.planner.draft(self._history(), text)

    async def _context_open(self, event: dict[str, Any]) -> None:
        """context.open {document_ids}: documents the user opened; retrieval searches them (unless the session's
        retrieval names its own document_ids)."""
        self._check_session(event)
        ids = event.get("document_ids")
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
            raise InvalidRequest("'document_ids' must be a non-empty list of strings", param="document_ids")
        if self.gateway.store is None:
            raise InvalidRequest("this server has no document store", param="document_ids")
        for doc_id in ids:
            if await self._documents().get(doc_id) is None:
                raise NotFound(f"no document {doc_id!r}", param="document_ids")
        self.open_documents = tuple(dict.fromkeys(ids))

    def _check_session(self, event: dict[str, Any]) -> None:
        session_id = v.get_str(event, "session_id", param="session_id")
        if session_id is not None and session_id != self.id:
            known = session_id in self.gateway.sessions
            raise InvalidRequest(
                f"session {session_id!r} is {'another connection' if known else 'unknown or closed'}; "
                f"this connection's session is {self.id!r}",
                param="session_id",
                code="unknown_session",
            )

    def _history(self) -> Messages:
        return tuple({"role": i["role"], "content": i["content"][0]["text"]} for i in self.items)

    async def _retrieve(self, query: str) -> list[ScoredChunk]:
        retrieval = self.settings["retrieval"]
        if retrieval is None or self.gateway.store is None:
            return []
        ids = retrieval["document_ids"] or list(self.open_documents) or None
        return await self._documents().search(query, retrieval["top_k"], ids)

    def _compose(self, documents: str, history: Messages, user: str | None) -> Messages:
        """system instructions + retrieved chunks (`documents`: their context_block, "" for none), then the
        conversation, then the user's message."""
        system = self.settings["instructions"] or ""
        if documents:
            system = (system + "\n\n" if system else "") + "Documents:\n\n" + documents
        head = ({"role": "system", "content": system},) if system else ()
        tail = ({"role": "user", "content": user},) if user is not None else ()
        return (*head, *history, *tail)

    def _defer_while_live(self) -> None:
        if self.gateway.num_live:
            # a pre-load's CPU work (retrieval's embedding, tokenizing, its own prompt chunk in each step) runs on
            # the cores live streams decode on: measured, four typing sessions raised a live stream's p99
            # inter-token latency 1.6x even with the engine's background budget; so it waits for them
            raise PreloadDeferred("live responses are streaming")

    async def _preload_context(self, text: str) -> str:
        """The planner's context of a draft: the chunks retrieval picks for it, rendered ("" without retrieval)."""
        self._defer_while_live()
        return context_block(await self._retrieve(text))

    async def _start_preload(self, target: Target) -> Generation:
        self._defer_while_live()
        assert isinstance(target.context, str)
        request = GenerateRequest(
            self.gateway.new_id("preload"),
            self.settings["model"],
            Sampling(max_tokens=1, temperature=0),
            messages=self._compose(target.context, target.messages, target.text),
            deadline=time.time() + self.gateway.config.preload_ttl_s,
            session_id=self.id,
            priority=PRELOAD_PRIORITY,
            prefill_only=True,
            open_last=True,
        )
        return await self.gateway.generate(request, tenant=self.tenant)  # its KV in the tenant's partition

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
        max_tokens = settings["max_output_tokens"]
        sampling = Sampling(
            max_tokens=None if max_tokens == "inf" else max_tokens,
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            seed=settings["seed"],
        )
        request = GenerateRequest(
            self.gateway.new_id("resp"), settings["model"], sampling, messages=(), session_id=self.id
        )
        self._cancel_requested = False
        use_cache = bool(settings["cache"])
        traceparent = event.get("traceparent")  # W3C trace context of the client's action: the trace joins it
        traceparent = traceparent if isinstance(traceparent, str) else None
        self._task = asyncio.create_task(
            self._respond(request, time.monotonic(), event.get("event_id"), use_cache, traceparent)
        )

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        if self._task is None or self._task.done():
            raise InvalidRequest("there is no response in progress", code="response_cancel_not_active")
        self._cancel_requested = True
        if self._generation is not None:
            await self._generation.cancel("client")

    # the response -------------------------------------------------------------------------------------
    async def _respond(
        self, request: GenerateRequest, started: float, event_id: Any, use_cache: bool, traceparent: str | None
    ) -> None:
        preload: dict[str, Any] = {"preloaded": False, "preload_predicted": False}
        try:
            if self.planner is not None:
                await self.planner.stop()  # what it computed stays in the prefix cache
            stopped = time.monotonic()
            history = self._history()
            *before, last = history
            user = last["content"] if last["role"] == "user" else None
            query = user or next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
            chunks = await self._retrieve(query)
            preload["preload_stop_ms"] = round((stopped - started) * 1000, 3)
            preload["retrieval_ms"] = round((time.monotonic() - stopped) * 1000, 3)
            if user is not None:
                history = tuple(before)
            documents = context_block(chunks)
            request = dataclasses.replace(request, messages=self._compose(documents, history, user))
            if self.planner is not None and user is not None:
                for key, completed in (("preloaded", True), ("preload_predicted", False)):
                    done = self.planner.matches(history, user, completed=completed)
                    preload[key] = done is not None and done.context == documents
            generation = await self.gateway.generate(
                request, started=started, tenant=self.tenant, use_cache=use_cache, traceparent=traceparent
            )
        except BlinkError as exc:
            await self.send(error_event(exc, event_id if isinstance(event_id, str) else None))
            return
        except Exception:  # a bug here must still answer the client, never leave it waiting
            log.exception("session %s: response %s could not start", self.id, request.request_id)
            error = BlinkError("the response could not start: internal error")
            await self.send(error_event(error, event_id if isinstance(event_id, str) else None))
            return
        self._generation = generation
        generation.preloaded = bool(preload["preloaded"])
        if self._cancel_requested:
            await generation.cancel("client")
        response_id, item_id = request.request_id, self.gateway.new_id("item")
        finish = functools.partial(self._finish, response_id=response_id, item_id=item_id, preload=preload)
        entry = self.gateway.responses.start(generation, self.tenant.name, finish, api="realtime", item_id=item_id)
        created = {
            "type": "response.created",
            "response": {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []},
        }
        # as OpenAI's Realtime API: the tenant's rate limits, at the start of each response (when it has any)
        limits = self.gateway.limits.rate_limits(self.tenant)
        updated = ({"type": "rate_limits.updated", "rate_limits": limits},) if limits else ()
        try:
            await self._follow(entry, -1, (created, *updated))
        finally:
            self._generation = None

    async def _follow(self, entry: ResponseLog[Generation], after: int, first: tuple[dict[str, Any], ...] = ()) -> None:
        """Send `first`, the response's deltas after `after`, live, then its closing events. A socket that closes
        under us ends only this reader: the response runs on, for a resume (gateway/resume.py)."""
        entry.attach()
        try:
            for event in first:
                await self.send(event)
            async for index, delta in entry.follow(after):
                await self.send(
                    {
                        "type": "response.output_text.delta",
                        "response_id": entry.response_id,
                        "item_id": entry.meta["item_id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": delta,
                        "delta_index": index,
                    }
                )
            for event in entry.final or ():
                await self.send(event)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # the socket closed under us
            log.debug("session %s: response %s not delivered: %s", self.id, entry.response_id, exc)
        finally:
            entry.detach()

    async def _response_resume(self, event: dict[str, Any]) -> None:
        """response.resume {response_id, after}: continue a response this key started (on a connection that
        is gone, or this one): its deltas after index `after` (-1: all), then its closing events."""
        if self._task is not None and not self._task.done():
            raise InvalidRequest(
                "a response is already in progress; cancel it or wait for response.done",
                code="conversation_already_has_active_response",
            )
        response_id = v.get_str(event, "response_id", required=True, param="response_id")
        assert response_id is not None
        after = v.get_number(event, "after", -1, 1 << 31, integer=True, param="after")
        entry = self.gateway.responses.get(response_id, self.tenant.name, "realtime")
        self._cancel_requested = False
        self._task = asyncio.create_task(self._resume(entry, -1 if after is None else int(after)))

    async def _resume(self, entry: ResponseLog[Generation], after: int) -> None:
        self._generation = entry.generation
        try:
            await self._follow(entry, after)
        finally:
            self._generation = None

    async def _finish(
        self, generation: Generation, *, response_id: str, item_id: str, preload: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The response's closing events (output_text.done, response.done); its text joins the conversation
        (whether or not a client is still connected to read them)."""
        status, details = _status(generation)
        text = generation.text
        events: list[dict[str, Any]] = []
        if status is not ResponseStatus.FAILED:
            events.append(
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
            await self._remember(item)
            output.append(item)
        fin = generation.finished
        prompt = (fin.prompt_tokens if fin else 0) or generation.prompt_tokens
        completion = fin.completion_tokens if fin else 0
        cache: dict[str, Any] = {"cache": generation.cache_status}
        if generation.lookup is not None and generation.lookup.hit is not None:
            cache["cache_similarity"] = round(generation.lookup.hit.similarity, 4)
        events.append(
            {
                "type": "response.done",
                "response": {
                    "id": response_id,
                    "object": "realtime.response",
                    "status": status.value,
                    "status_details": details,
                    **cache,
                    "output": output,
                    "usage": {
                        "input_tokens": prompt,
                        "output_tokens": completion,
                        "total_tokens": prompt + completion,
                        "input_token_details": {"cached_tokens": fin.cached_tokens if fin else 0},
                    },
                    "timings": {
                        **generation.timings(),
                        "prompt_tokens": prompt,
                        "cached_tokens": fin.cached_tokens if fin else 0,
                        **preload,
                    },
                },
            }
        )
        return events

    async def _remember(self, item: dict[str, Any]) -> None:
        """Add an assistant item to the conversation: in the store, and in this session's connection(s) here."""
        for session in {self, self.gateway.sessions.get(self.id) or self}:
            if all(i["id"] != item["id"] for i in session.items):
                session.items.append(item)
        try:
            await self.gateway.session_store.append_item(self.id, item)
        except BlinkError as exc:
            log.warning("session %s: the answer was not stored in the session: %s", self.id, exc.message)

    async def _abandon(self) -> None:
        """The client left: cancel the pre-load (the replica frees its sequences) and stop reading the response,
        which runs on for --resume-window-s in case the client comes back (then it is cancelled)."""
        if self.planner is not None:
            await self.planner.stop()
        task = self._task
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


async def refuse(ws: WebSocket, exc: BlinkError) -> None:
    """Answer a handshake with the error's HTTP response (denial-response extension), else close it (1008)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(exc))
    else:
        await ws.close(1008, exc.message)


async def realtime_endpoint(ws: WebSocket) -> None:
    gateway: Gateway = ws.app.state.gateway
    await RealtimeSession(ws, gateway).run()
