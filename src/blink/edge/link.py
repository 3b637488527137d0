"""An edge's link to its core: one WebSocket to the core's /v1/link (gateway/link.py lists the frames), opened at
start and kept: a ping every `ping_interval_s` keeps it warm and measures the round trip, a missed pong closes it,
and it reconnects with back-off. Requests and pre-loads for the core's models ride it multiplexed by id, so none
pays a TCP or TLS handshake.

    link = Link("http://core:8000", key, resume_window_s=10.0)
    await link.start()                         # connects in the background; `connected`, `rtt_s`, `models`
    stream = await link.submit(request)        # a bus ResponseStream: Accepted, TokenEvent*, Finished
    await link.cancel(request_id)

When the link drops, the responses in flight wait for it: on reconnect each resumes from the last delta it holds
(the core keeps them running for its --resume-window-s). A submit while the link is down, and a response the link
could not resume within `resume_window_s`, end with core_unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from blink.bus.messages import (
    Accepted,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaStatus,
    ResponseEvent,
    TokenEvent,
    from_dict,
    to_dict,
)
from blink.errors import CoreUnreachable

log = logging.getLogger("blink.edge.link")

RTT_WEIGHT = 0.2  # the RTT estimate's smoothing: each ping's sample counts this much


def link_url(core: str) -> str:
    """The core's /v1/link WebSocket URL from its HTTP base URL (https: wss)."""
    url = urlsplit(core)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"--core must be the core gateway's http(s)://host:port (got {core!r})")
    return urlunsplit(("wss" if url.scheme == "https" else "ws", url.netloc, url.path.rstrip("/") + "/v1/link", "", ""))


class LinkStream:
    """One request's events from the core, in order, ending with Finished (a bus ResponseStream)."""

    def __init__(self, link: Link, request: GenerateRequest) -> None:
        self.request_id = request.request_id
        self.request = request
        self._link = link
        self._queue: asyncio.Queue[ResponseEvent] = asyncio.Queue()
        self.after = -1  # index of the last delta received: a resume continues after it
        self.accepted = False
        self.ended = False

    def feed(self, event: ResponseEvent) -> None:
        if self.ended:
            return
        if isinstance(event, Finished):
            self.ended = True
            self._link._streams.pop(self.request_id, None)
        self._queue.put_nowait(event)

    def fail(self, message: str) -> None:
        self.feed(Finished(self.request_id, FinishStatus.ERROR, error_code="core_unreachable", error_message=message))

    async def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished):
                return

    async def close(self) -> None:
        self.ended = True
        self._link._streams.pop(self.request_id, None)


class Link:
    def __init__(
        self,
        core: str,
        key: str = "",
        *,
        resume_window_s: float = 10.0,
        ping_interval_s: float = 1.0,
        ping_timeout_s: float = 3.0,
        connect_timeout_s: float = 2.0,
        max_backoff_s: float = 2.0,
        on_status: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.core = core
        self.url = link_url(core)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.resume_window_s = resume_window_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_backoff_s = max_backoff_s
        self.on_status = on_status  # called with the core's models on each status frame
        self.models: list[str] = []
        self.rtt_s: float | None = None  # smoothed round trip of the pings
        self.connects = 0  # connections opened since start (1 + reconnects)
        self._statuses: list[ReplicaStatus] = []
        self._streams: dict[str, LinkStream] = {}
        self._cancels: dict[str, str | None] = {}  # cancelled while the link was down (id: tenant): said on reconnect
        self._ws: ClientConnection | None = None
        self._down_since: float | None = time.monotonic()
        self._pong = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def replicas(self) -> list[ReplicaStatus]:
        """The core's replicas as its last status said; kept while the link is down and its responses may still
        resume (so they are not taken for dead), dropped when they are given up."""
        return list(self._statuses)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.connected

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for stream in list(self._streams.values()):
            stream.fail("the edge is shutting down")

    # requests ---------------------------------------------------------------------------------------
    async def submit(self, request: GenerateRequest) -> LinkStream:
        if self._ws is None:
            raise CoreUnreachable(f"the core ({self.core}) is unreachable from this edge; retry shortly")
        stream = LinkStream(self, request)
        self._streams[request.request_id] = stream
        await self._send({"op": "submit", "request": to_dict(request)})  # lost with the link: resumed on reconnect
        return stream

    async def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if self._ws is None:  # said on reconnect; the response ends here now
            self._cancels[request_id] = stream.request.tenant
            stream.feed(Finished(request_id, FinishStatus.CANCELLED))
            return
        await self._send({"op": "cancel", "id": request_id, "tenant": stream.request.tenant})

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(frame, separators=(",", ":")))

    # the connection -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                ws = await connect(
                    self.url,
                    additional_headers=self._headers,
                    open_timeout=self.connect_timeout_s,
                    ping_interval=None,  # the link pings itself, and measures the RTT as it does
                    max_size=16 << 20,
                    compression=None,
                )
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:  # closed mid-handshake: a cut
                if failures == 0 or isinstance(exc, InvalidStatus):
                    log.warning("link: cannot reach the core at %s: %r; retrying", self.url, exc)
                failures += 1
                self._expire()
                await asyncio.sleep(min(self.max_backoff_s, 0.05 * 2**failures))
                continue
            failures = 0
            await self._serve(ws)

    async def _serve(self, ws: ClientConnection) -> None:
        self._ws, self._down_since = ws, None
        self.connects += 1
        log.info("link: connected to the core at %s (connection %d)", self.url, self.connects)
        cancels, self._cancels = self._cancels, {}
        for rid, tenant in cancels.items():
            await self._send({"op": "cancel", "id": rid, "tenant": tenant})
        for stream in list(self._streams.values()):  # the responses in flight when the last connection dropped
            await self._send(
                {"op": "resume", "id": stream.request_id, "tenant": stream.request.tenant, "after": stream.after}
            )
        pinger = asyncio.create_task(self._ping(ws))
        try:
            async for raw in ws:
                self._on_frame(raw)
        except ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            ws.transport.abort()  # already closed, or the edge is stopping: nothing is left to say
            self._ws, self._down_since = None, time.monotonic()
            self._ready.clear()
            log.warning("link: lost the core at %s; reconnecting", self.url)

    async def _ping(self, ws: ClientConnection) -> None:
        while True:
            sent = time.monotonic()
            self._pong.clear()
            await self._send({"op": "ping", "t": sent})
            try:
                await asyncio.wait_for(self._pong.wait(), self.ping_timeout_s)
            except TimeoutError:
                log.warning("link: no pong from the core in %.1f s; dropping the connection", self.ping_timeout_s)
                ws.transport.abort()  # a dead path never completes a closing handshake
                return
            sample = time.monotonic() - sent
            self.rtt_s = sample if self.rtt_s is None else (1 - RTT_WEIGHT) * self.rtt_s + RTT_WEIGHT * sample
            await asyncio.sleep(max(0.0, self.ping_interval_s - sample))

    def _expire(self) -> None:
        """Give up the responses the link could not resume within its window, and the core's replicas."""
        down = self._down_since
        if down is None or time.monotonic() - down < self.resume_window_s:
            return
        self._statuses = []
        for stream in list(self._streams.values()):
            stream.fail(
                f"the link to the core ({self.core}) was down for over {self.resume_window_s:g} s and this "
                "response could not resume; retry it"
            )

    def _on_frame(self, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
            self._take(frame)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("link: a frame from the core this edge cannot read (%r): %.200r", exc, raw)

    def _take(self, frame: dict[str, Any]) -> None:
        op = frame["op"]
        if op == "pong":
            self._pong.set()
            return
        if op == "status":
            self.models = [str(m) for m in frame["models"]]
            self._statuses = [s for s in map(from_dict, frame["replicas"]) if isinstance(s, ReplicaStatus)]
            self._ready.set()
            if self.on_status is not None:
                self.on_status(self.models)
            return
        stream = self._streams.get(str(frame.get("id")))
        if stream is None:
            if op == "error":
                log.warning("link: the core refused a frame: %s", frame.get("message"))
            return
        rid = stream.request_id
        if op == "accepted" and not stream.accepted:
            stream.accepted = True
            stream.feed(Accepted(rid, str(frame["replica"]), int(frame["prompt_tokens"])))
        elif op == "delta" and int(frame["i"]) > stream.after:
            stream.after = int(frame["i"])
            stream.feed(TokenEvent(rid, stream.after, str(frame["text"]), stream.after + 1))
        elif op == "done":
            finished = from_dict(frame["finished"])
            if isinstance(finished, Finished):
                stream.feed(finished)
        elif op == "error":
            code, message, param = str(frame.get("code")), str(frame.get("message")), frame.get("param")
            stream.feed(Finished(rid, FinishStatus.ERROR, error_code=code, error_message=message, error_param=param))
        elif op == "gone":
            if stream.accepted:
                stream.fail("the core no longer has this response (it ended while the link was down); retry it")
            else:  # the submit was lost with the connection: send it again
                task = asyncio.get_running_loop().create_task(
                    self._send({"op": "submit", "request": to_dict(stream.request)})
                )
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
