"""The core's end of an edge's link (`blink edge --core URL`, edge/link.py): one WebSocket at /v1/link per edge,
opened once and kept, carrying any number of requests at once, each by its id.

    edge -> core   {"op": "submit", "request": GenerateRequest}     (bus/messages.to_dict)
                   {"op": "cancel", "id", "tenant"}   {"op": "resume", "id", "tenant", "after": last delta index held}
                   {"op": "ping", "t"}
    core -> edge   {"op": "status", "models", "replicas": [ReplicaStatus]}   on connect, then every STATUS_INTERVAL_S
                   {"op": "accepted", "id", "replica", "prompt_tokens"}
                   {"op": "delta", "id", "i", "text"}       i: 0, 1, 2, ... (the point a resume continues from)
                   {"op": "done", "id", "finished": Finished}
                   {"op": "error", "id"?, "code", "message", "param"}   a refused submit (nothing more of it follows),
                                                                          or a frame this end could not take
                   {"op": "gone", "id"}                     a resume of a response this gateway no longer has
                   {"op": "pong", "t"}

A forwarded request runs through this gateway as one of its own (its tenant's limits; tracing joins the edge's trace
through the request's traceparent) but skips this gateway's semantic cache: the edge looked in its own. Its deltas
go into the resumable response log (resume.py), so when the link drops the response runs on for --resume-window-s,
and the edge's next connection resumes it from the last delta it holds.

Who may link: on a server with API keys only an admin key, since a link asserts each request's tenant (which must
be one of this server's tenants); an open server (loopback) takes any link and keeps the edge's tenants apart by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from blink.bus.messages import Finished, FinishStatus, GenerateRequest, from_dict, to_dict
from blink.errors import BlinkError, InvalidRequest, PermissionDenied
from blink.gateway.auth import tenant_of
from blink.gateway.generation import Generation
from blink.gateway.keys import Tenant
from blink.gateway.resume import ResponseLog
from blink.gateway.service import Gateway, gateway_of

log = logging.getLogger("blink.gateway.link")

API = "link"  # the response logs' api: only a link resumes a link's response
STATUS_INTERVAL_S = 1.0
IDLE_TIMEOUT_S = 5.0  # an edge pings every second: this long without a frame is a dead path (a cut keeps the socket)


async def link_endpoint(ws: WebSocket) -> None:
    gateway = gateway_of(ws)
    if gateway.auth.keyed and not tenant_of(ws.scope).admin:
        # closed before the handshake completes: the edge sees 403 and says why in its log
        await ws.close(code=1008, reason="an edge link needs an admin key")
        return
    await ws.accept()
    await CoreLink(gateway, ws).run()


class CoreLink:
    """One edge's connection: a reader taking frames, a writer sending them in order, a follower per response."""

    def __init__(self, gateway: Gateway, ws: WebSocket) -> None:
        self.gateway = gateway
        self.ws = ws
        self._out: asyncio.Queue[str] = asyncio.Queue()
        # every link's followers by response id (a resume on a new connection stops the old connection's follower)
        self._followers: dict[str, asyncio.Task[None]] = ws.app.state.__dict__.setdefault("link_followers", {})
        self._mine: set[asyncio.Task[None]] = set()

    def send(self, frame: dict[str, Any]) -> None:
        self._out.put_nowait(json.dumps(frame, separators=(",", ":")))

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        status = asyncio.create_task(self._status())
        try:
            while not writer.done():
                try:
                    message = await asyncio.wait_for(self.ws.receive(), IDLE_TIMEOUT_S)
                except TimeoutError:
                    log.warning("link: no frame from the edge for %.0f s; closing its connection", IDLE_TIMEOUT_S)
                    break
                if message["type"] == "websocket.disconnect":
                    break
                self._take(message.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            for task in (status, writer, *self._mine):
                task.cancel()  # each follower detaches: its response waits --resume-window-s for a resume
            with contextlib.suppress(Exception):
                await self.ws.close()

    def _take(self, text: str | None) -> None:
        try:
            if text is None:
                raise InvalidRequest("the link carries JSON text frames", code="binary_frame")
            try:
                frame = json.loads(text)
            except ValueError:
                raise InvalidRequest("a link frame is not JSON", code="invalid_json") from None
            if not isinstance(frame, dict):
                raise InvalidRequest("a link frame is a JSON object", code="invalid_event")
            self._handle(frame)
        except BlinkError as exc:
            self.send({"op": "error", "code": exc.code, "message": exc.message, "param": exc.param})

    def _handle(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "ping":
            self.send({"op": "pong", "t": frame.get("t")})
        elif op == "submit":
            try:
                request = from_dict(frame["request"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidRequest(f"a submit without a valid request: {exc}", code="invalid_event") from None
            if not isinstance(request, GenerateRequest):
                raise InvalidRequest("a submit carries a generate request", code="invalid_event")
            self._spawn(self._serve(request))
        elif op in ("cancel", "resume"):
            request_id, tenant = str(frame.get("id")), self._tenant(str(frame.get("tenant")))
            try:
                entry = self.gateway.responses.get(request_id, tenant.name, API)
            except BlinkError:
                if op == "resume":
                    self.send({"op": "gone", "id": request_id})
                return
            if op == "cancel":
                self.gateway.background(entry.generation.cancel("client"))
            else:
                self._start_follower(entry, int(frame.get("after", -1)))
        else:
            raise InvalidRequest(f"unknown link op {op!r}", code="unknown_event_type")

    def _tenant(self, name: str) -> Tenant:
        tenant = self.gateway.auth.tenant_named(name)
        if tenant is None:
            raise PermissionDenied(f"the edge forwarded a request of tenant {name!r}, which this server does not have")
        return tenant

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._mine.add(task)
        task.add_done_callback(self._mine.discard)

    async def _serve(self, request: GenerateRequest) -> None:
        rid = request.request_id
        try:
            tenant = self._tenant(request.tenant or "")
            generation = await self.gateway.generate(
                request, tenant=tenant, use_cache=False, traceparent=request.traceparent
            )
        except BlinkError as exc:
            self.send({"op": "error", "id": rid, "code": exc.code, "message": exc.message, "param": exc.param})
            return
        entry = self.gateway.responses.start(generation, tenant.name, _finish, api=API)
        self._start_follower(entry, -1)

    def _start_follower(self, entry: ResponseLog[Generation], after: int) -> None:
        old = self._followers.get(entry.response_id)
        if old is not None:
            old.cancel()  # the connection it sent on is gone (the edge resumed on a new one)
        task = asyncio.get_running_loop().create_task(self._follow(entry, after))
        self._followers[entry.response_id] = task
        self._mine.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._mine.discard(t)
            if self._followers.get(entry.response_id) is t:
                del self._followers[entry.response_id]

        task.add_done_callback(done)

    async def _follow(self, entry: ResponseLog[Generation], after: int) -> None:
        generation = entry.generation
        rid = entry.response_id
        entry.attach()
        try:
            replica = generation.replica_id or ""
            self.send({"op": "accepted", "id": rid, "replica": replica, "prompt_tokens": generation.prompt_tokens})
            async for index, text in entry.follow(after):
                self.send({"op": "delta", "id": rid, "i": index, "text": text})
            for frame in entry.final or []:
                self.send(frame)
        finally:
            entry.detach()

    async def _write(self) -> None:
        try:
            while True:
                await self.ws.send_text(await self._out.get())
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            log.info("link: the edge's connection closed (%r)", exc)

    async def _status(self) -> None:
        while True:
            replicas = [to_dict(r) for r in self.gateway.bus.replicas()]
            self.send({"op": "status", "models": list(self.gateway.models), "replicas": replicas})
            await asyncio.sleep(STATUS_INTERVAL_S)


async def _finish(generation: Generation) -> list[Any]:
    finished = generation.finished or Finished(generation.request_id, FinishStatus.CANCELLED)
    return [{"op": "done", "id": generation.request_id, "finished": to_dict(finished)}]
