"""A realtime session's responses: one at a time, each running detached from the connection (gateway/resume.py)
so a client that lost its socket resumes it; its events are events.py's ResponseShape.

    in_progress ──▶ completed | cancelled | incomplete | failed (each final)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.websockets import WebSocketDisconnect

from blink.bus.messages import GenerateRequest
from blink.errors import BlinkError, InvalidRequest
from blink.gateway.generation import Generation
from blink.gateway.keys import Tenant
from blink.gateway.realtime.conversation import Conversation
from blink.gateway.realtime.events import ResponseShape, response_status, usage
from blink.gateway.realtime.prompt import Prompter, predecode_key, sampling_of
from blink.gateway.realtime.protocol import ResponseCreate, ResponseResume, item_text
from blink.gateway.resume import ResponseLog
from blink.gateway.service import Gateway
from blink.gateway.wire import error_event
from blink.preload.planner import Messages, PrefillPlanner
from blink.preload.predecode import Predecoder

log = logging.getLogger("blink.gateway.realtime")

BUSY = "a response is already in progress; cancel it or wait for response.done"
Send = Callable[..., Awaitable[None]]


class Responses:
    def __init__(
        self,
        gateway: Gateway,
        tenant: Tenant,
        conversation: Conversation,
        prompter: Prompter,
        planner: PrefillPlanner | None,
        predecoder: Predecoder | None,
        send: Send,
        remember: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.gateway, self.tenant, self.conversation = gateway, tenant, conversation
        self.prompter, self.planner, self.predecoder = prompter, planner, predecoder
        self._send, self._remember = send, remember
        self._task: asyncio.Task[None] | None = None
        self._generation: Generation | None = None
        self._cancel_requested = False

    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _messages_of(self, event: ResponseCreate) -> Messages:
        """The messages a response answers: its own `input` (item references resolved), else the conversation."""
        if event.input is None:
            messages = self.conversation.history()
        else:
            messages = tuple(
                {"role": x.role, "content": x.text}
                if x.ref is None
                else {
                    "role": (item := self.conversation.item(x.ref, "response.input"))["role"],
                    "content": item_text(item),
                }
                for x in event.input
            )
        if not any(m["role"] == "user" for m in messages):
            raise InvalidRequest(
                "the conversation has no user message yet; send conversation.item.create first",
                code="empty_conversation",
            )
        return messages

    async def create(self, event: ResponseCreate) -> None:
        if self.busy():
            raise InvalidRequest(BUSY, code="conversation_already_has_active_response")
        messages = self._messages_of(event)
        settings = event.settings
        sampling = sampling_of(settings)
        session_id = self.conversation.session_id
        request = GenerateRequest(
            self.gateway.new_id("resp"),
            settings.model,
            sampling,
            messages=(),
            session_id=session_id,
            prediction=event.prediction,
        )
        shape = ResponseShape(
            request.request_id,
            self.gateway.new_id("item"),
            session_id,
            settings,
            event.in_conversation,
            self.conversation.last_id if event.in_conversation else None,
            event.metadata,
        )
        self._cancel_requested = False
        self._task = asyncio.create_task(self._respond(request, shape, messages, event, time.monotonic()))

    async def cancel(self) -> None:
        if not self.busy():
            raise InvalidRequest("there is no response in progress", code="response_cancel_not_active")
        self._cancel_requested = True
        if self._generation is not None:
            await self._generation.cancel("client")

    async def resume(self, event: ResponseResume) -> None:
        """response.resume {response_id, after}: continue a response this key started (on a connection that
        is gone, or this one): its deltas after index `after` (-1: all), then its closing events."""
        if self.busy():
            raise InvalidRequest(BUSY, code="conversation_already_has_active_response")
        entry = self.gateway.responses.get(event.response_id, self.tenant.name, "realtime")
        self._cancel_requested = False
        self._task = asyncio.create_task(self._follow(entry, event.after))

    async def abandon(self) -> None:
        """Stop reading the response (the client left): it runs on for --resume-window-s, for a resume."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _start(
        self, request: GenerateRequest, messages: Messages, event: ResponseCreate, started: float
    ) -> tuple[Generation, dict[str, Any]]:
        """Stop the pre-load, build the prompt, start the generation; and what pre-loading did for it."""
        preload: dict[str, Any] = {"preloaded": False, "preload_predicted": False}
        if self.planner is not None:
            await self.planner.stop()  # what it computed stays in the prefix cache
        preload["preload_stop_ms"] = round((time.monotonic() - started) * 1000, 3)
        prompt = await self.prompter.build(messages)
        preload["retrieval_ms"] = prompt.retrieval_ms
        if self.planner is not None and prompt.user is not None and event.input is None:
            for key, completed in (("preloaded", True), ("preload_predicted", False)):
                done = self.planner.matches(prompt.history, prompt.user, completed=completed)
                preload[key] = done is not None and done.context == prompt.documents
        adopt = None
        if self.predecoder is not None:  # the answer's first tokens, decoded while the user paused
            exact = event.input is None and event.prediction is None
            adopt = self.predecoder.take(
                predecode_key(request.model, prompt.messages, request.sampling) if exact else None
            )
        generation = await self.gateway.generate(
            dataclasses.replace(request, messages=prompt.messages, adopt=adopt),
            started=started,
            tenant=self.tenant,
            use_cache=event.settings.cache,
            traceparent=event.traceparent,
        )
        if adopt is not None and generation.cache_hit:  # answered from the cache: nobody adopts it
            await self.gateway.bus.cancel(adopt, request.model)
        generation.preloaded = bool(preload["preloaded"])
        return generation, preload

    async def _respond(
        self, request: GenerateRequest, shape: ResponseShape, messages: Messages, event: ResponseCreate, started: float
    ) -> None:
        try:
            generation, preload = await self._start(request, messages, event, started)
        except BlinkError as exc:
            await self._send(error_event(exc, event.event_id))
            return
        except Exception:  # a bug here must still answer the client, never leave it waiting
            log.exception("response %s could not start", request.request_id)
            await self._send(error_event(BlinkError("the response could not start: internal error"), event.event_id))
            return
        if self._cancel_requested:
            await generation.cancel("client")
        finish = functools.partial(self._finish, shape=shape, preload=preload)
        entry = self.gateway.responses.start(generation, self.tenant.name, finish, api="realtime", shape=shape)
        # as OpenAI's Realtime API: the tenant's rate limits, at the start of each response (when it has any)
        await self._follow(entry, -1, shape.opening(self.gateway.limits.rate_limits(self.tenant)))

    async def _follow(self, entry: ResponseLog[Generation], after: int, first: Sequence[dict[str, Any]] = ()) -> None:
        """Send `first`, the response's deltas after `after`, live, then its closing events. A socket that closes
        under us ends only this reader: the response runs on, for a resume (gateway/resume.py)."""
        shape: ResponseShape = entry.meta["shape"]
        self._generation = entry.generation
        entry.attach()
        try:
            await self._send(*first)
            async for index, delta in entry.follow(after):
                await self._send(shape.delta(index, delta))
            await self._send(*(entry.final or ()))
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # the socket closed under us
            log.debug("response %s not delivered: %s", entry.response_id, exc)
        finally:
            entry.detach()
            self._generation = None

    async def _finish(
        self, generation: Generation, *, shape: ResponseShape, preload: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The response's closing events; in the conversation, its text joins it (whether or not a client is
        still connected to read them)."""
        fin = generation.finished
        assert fin is not None
        status, details = response_status(fin, generation.cancel_reason)
        prompt = fin.prompt_tokens or generation.prompt_tokens
        extra: dict[str, Any] = {"cache": generation.cache_status, "route": generation.route}
        if generation.degraded:
            extra["degraded"] = True
        if generation.lookup is not None and generation.lookup.hit is not None:
            extra["cache_similarity"] = round(generation.lookup.hit.similarity, 4)
        extra["usage"] = usage(
            prompt, fin.completion_tokens, fin.cached_tokens, (fin.prediction_accepted, fin.prediction_rejected)
        )
        timings = {"prompt_tokens": prompt, "cached_tokens": fin.cached_tokens, **preload}
        extra["timings"] = {"predecoded_tokens": 0, **generation.timings(), **timings}
        item, events = shape.closing(status, details, generation.text, extra)
        if shape.in_conversation and generation.text:
            await self._remember(item)
        return events
