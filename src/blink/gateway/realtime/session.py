"""WebSocket /v1/realtime: a session over one connection. This file moves bytes and dispatches; the protocol
itself (frames → typed events: protocol.py; server events: events.py; settings.py) has no I/O, the prompt is
prompt.py, the conversation conversation.py, the response in progress responses.py.

Sessions outlive connections (gateway/sessions.py: in memory, or in Redis with --redis): connecting to
`/v1/realtime?session_id=<id>` continues that session (its settings and conversation) with the same API key, on
this gateway or another on the same Redis. A response runs detached from the connection (gateway/resume.py):
each `response.output_text.delta` carries `delta_index` (0, 1, ...), and a client that lost its connection sends
`response.resume {response_id, after: <last delta_index it has, -1 for none>}` on a new one to get the rest, then
its closing events, with nothing lost or repeated (within --resume-window-s, on the gateway that runs it).

Pre-loading (preload/planner.py): each `input_text.draft` re-targets the session's PrefillPlanner, which
prefills the predicted prompt on the replica at low priority; at response.create the planner stops and the
prompt finds those blocks in the prefix cache.

One response runs at a time and the reader keeps reading while it streams, so `response.cancel` takes effect
within one engine step. An invalid event gets an `error` event (with the offending `event_id`) and the session
stays open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from blink.errors import BlinkError, InvalidRequest, NotFound, RateLimited
from blink.gateway.auth import tenant_of
from blink.gateway.limits import Coalescer
from blink.gateway.realtime import protocol as p
from blink.gateway.realtime.conversation import Conversation
from blink.gateway.realtime.events import session_event, stamped
from blink.gateway.realtime.prompt import Prompter
from blink.gateway.realtime.responses import Responses
from blink.gateway.realtime.settings import SessionSettings
from blink.gateway.service import Gateway, gateway_of
from blink.gateway.sessions import SessionRecord
from blink.gateway.wire import error_event, error_response, ws_api_key
from blink.preload.planner import PrefillPlanner
from blink.preload.predecode import Predecoder

log = logging.getLogger("blink.gateway.realtime")


class RealtimeSession:
    def __init__(self, ws: WebSocket, gateway: Gateway) -> None:
        self.ws, self.gateway = ws, gateway
        self.id = gateway.new_id("sess")
        self.settings = SessionSettings(gateway.default_model, cache=gateway.cache is not None)
        self.tenant = tenant_of(ws.scope)  # authenticated at the handshake (gateway/auth.py)
        _, self._subprotocol = ws_api_key(ws.headers, list(ws.scope.get("subprotocols") or []))
        self.open_documents: tuple[str, ...] = ()
        self.parser = p.Parser(gateway, gateway.config.max_request_bytes)
        self.prompter = Prompter(gateway, self.tenant, self)
        self.planner = (
            PrefillPlanner(self.prompter.start_preload, context=self.prompter.preload_context)
            if gateway.config.preload
            else None
        )
        self.predecoder = (
            Predecoder(
                self.prompter.start_predecode,
                self._cancel_predecode,
                max_tokens=gateway.config.predecode_tokens,
                on_outcome=gateway.metrics.predecoded,
                spare=lambda: gateway.num_live == 0,  # no live stream: a question mark is pre-decoded at once
            )
            if gateway.config.preload and gateway.config.predecode_tokens > 0
            else None
        )
        self._drafts = Coalescer(self.tenant.limits.drafts_per_second)
        self._send_lock = asyncio.Lock()
        self._start([])

    def _start(self, items: list[dict[str, Any]]) -> None:
        """The conversation (and its responses) of session `self.id`, holding `items`."""
        gateway = self.gateway
        self.conversation = Conversation(self.id, items, gateway.session_store, self.tenant.limits, gateway.new_id)
        self.responses = Responses(
            gateway,
            self.tenant,
            self.conversation,
            self.prompter,
            self.planner,
            self.predecoder,
            self.send,
            self._remember,
        )

    async def send(self, *events: dict[str, Any]) -> None:
        async with self._send_lock:
            for event in events:
                await self.ws.send_text(json.dumps(stamped(event), separators=(",", ":")))

    # the connection -----------------------------------------------------------------------------------
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
        await self.send(session_event("session.created", self.id, self.settings))
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._on_frame(message.get("text"))
        except WebSocketDisconnect:
            return
        finally:
            if self.gateway.sessions.get(self.id) is self:
                del self.gateway.sessions[self.id]
            if self.planner is not None:
                await self.planner.stop()  # the replica frees its sequences
            if self.predecoder is not None:
                await self.predecoder.stop()
            await self.responses.abandon()

    async def _open(self) -> bool:
        """Continue the session the URL names (?session_id=) or create a new one (with the model of ?model=, if
        given); False (after an error event) when the named session is not this key's, the model is not served,
        or the store is unreachable."""
        store = self.gateway.session_store
        wanted, model = self.ws.query_params.get("session_id"), self.ws.query_params.get("model")
        try:
            if model is not None:  # as OpenAI's /v1/realtime?model=: the session's model
                self.gateway.check_model(model)
                self.settings = dataclasses.replace(self.settings, model=model)
            if wanted is None:
                await store.create(self.id, SessionRecord(self.tenant.name, self.settings.to_wire()))
                return True
            record = await store.load(wanted, self.tenant.name)
        except BlinkError as exc:
            await self.send(error_event(exc))
            return False
        if record is None:
            message = f"no session {wanted!r} for this API key (unknown, expired, or another key's)"
            await self.send(error_event(NotFound(message, param="session_id", code="session_not_found")))
            return False
        self.id = wanted
        self.settings = SessionSettings.from_stored(record.settings, self.settings)  # ?model= aside: the session's
        self._start(record.items)
        return True

    async def _on_frame(self, text: str | None) -> None:
        event_id = None
        try:
            event = self.parser.parse(text, self.settings)
            event_id = event.event_id
            await self._dispatch(event)
        except p.Refused as refused:
            await self.send(error_event(refused.error, refused.event_id))
        except BlinkError as exc:
            await self.send(error_event(exc, event_id))
        except Exception:  # a bug in one handler answers that event with an error; the session stays open
            log.exception("session %s: event failed", self.id)
            await self.send(error_event(BlinkError("internal error handling the event"), event_id))

    async def _dispatch(self, event: p.ClientEvent) -> None:
        match event:
            case p.SessionUpdate(settings=settings):
                self.settings = settings
                await self.gateway.session_store.save_settings(self.id, settings.to_wire())
                await self.send(session_event("session.updated", self.id, settings))
            case p.ItemCreate():
                await self.send(*await self.conversation.create(event))
            case p.ItemRetrieve(item_id=item_id):
                await self.send({"type": "conversation.item.retrieved", "item": self.conversation.item(item_id)})
            case p.ItemDelete(item_id=item_id):
                await self.send(await self.conversation.delete(item_id))
            case p.ResponseCreate():
                await self.responses.create(event)
            case p.ResponseCancel():
                await self.responses.cancel()
            case p.ResponseResume():
                await self.responses.resume(event)
            case p.Draft():
                self._draft(event)
            case p.ContextOpen():
                await self._context_open(event)

    async def _remember(self, item: dict[str, Any]) -> None:
        """Add an answer to the conversation: in the store, and in this session's connection(s) here."""
        other = self.gateway.sessions.get(self.id)
        if other is not None and other is not self:
            other.conversation.adopt(item)
        try:
            await self.conversation.remember(item)
        except BlinkError as exc:
            log.warning("session %s: the answer was not stored in the session: %s", self.id, exc.message)

    # pre-loading --------------------------------------------------------------------------------------
    def _draft(self, event: p.Draft) -> None:
        """input_text.draft {text}: the user's unsent text. Every keystroke may send one; the planner coalesces."""
        self._check_session(event.session_id)
        if self.planner is not None and not self.responses.busy():
            # over the tenant's drafts_per_second, the latest draft waits (one at most) and the others are dropped
            self._drafts.offer(functools.partial(self._plan, event.text))

    def _plan(self, text: str) -> None:
        if self.planner is not None and not self.responses.busy():
            self.planner.draft(self.conversation.history(), text)
            if self.predecoder is not None:
                self.predecoder.draft(self.conversation.history(), text)

    async def _cancel_predecode(self, request_id: str) -> None:
        await self.gateway.bus.cancel(request_id, self.settings.model)

    async def _context_open(self, event: p.ContextOpen) -> None:
        """context.open {document_ids}: documents the user opened; retrieval searches them (unless the session's
        retrieval names its own document_ids)."""
        self._check_session(event.session_id)
        for doc_id in event.document_ids:
            if await self.prompter.documents().get(doc_id) is None:
                raise NotFound(f"no document {doc_id!r}", param="document_ids")
        self.open_documents = event.document_ids

    def _check_session(self, session_id: str | None) -> None:
        if session_id is not None and session_id != self.id:
            known = session_id in self.gateway.sessions
            raise InvalidRequest(
                f"session {session_id!r} is {'another connection' if known else 'unknown or closed'}; "
                f"this connection's session is {self.id!r}",
                param="session_id",
                code="unknown_session",
            )


async def refuse(ws: WebSocket, exc: BlinkError) -> None:
    """Answer a handshake with the error's HTTP response (denial-response extension), else close it (1008)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(exc))
    else:
        await ws.close(1008, exc.message)


async def realtime_endpoint(ws: WebSocket) -> None:
    await RealtimeSession(ws, gateway_of(ws)).run()
