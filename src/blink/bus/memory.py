"""The embedded in-process transport: asyncio queues, one event loop, no serialisation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from blink.bus.messages import (
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    ResponseEvent,
    WorkMessage,
)
from blink.errors import Overloaded


class MemoryResponseStream:
    def __init__(self, bus: MemoryBus, request_id: str, max_events: int) -> None:
        self.request_id = request_id
        self._bus = bus
        self._queue: asyncio.Queue[ResponseEvent] = asyncio.Queue(maxsize=max_events)
        self.overflowed = False
        self.closed = False

    def offer(self, event: ResponseEvent) -> bool:
        if self.closed or self.overflowed:
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            return False
        return True

    async def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        while True:
            if self.overflowed and self._queue.empty():
                yield Finished(
                    self.request_id,
                    FinishStatus.ERROR,
                    error_code="slow_consumer",
                    error_message="the client read too slowly; the response was cancelled",
                )
                return
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished):
                return

    async def close(self) -> None:
        self.closed = True
        self._bus._streams.pop(self.request_id, None)


class MemoryBus:
    reclaims: bool = False  # one process: its replicas die with it
    step_poll_s: float = 0.002  # a look is a few dict reads

    def __init__(self, *, max_pending: int = 256, stream_events: int = 1024, heartbeat_timeout: float = 10.0) -> None:
        self.max_pending = max_pending
        self.stream_events = stream_events
        self.heartbeat_timeout = heartbeat_timeout
        self._pools: dict[str, asyncio.Queue[GenerateRequest]] = {}
        self._streams: dict[str, MemoryResponseStream] = {}
        self._inboxes: dict[str, list[Cancel]] = {}  # replica_id -> cancels not yet received
        self._direct: dict[str, deque[GenerateRequest]] = {}  # replica_id -> requests submitted to it
        self._wakeups: dict[str, asyncio.Event] = {}
        self._pool_of: dict[str, str] = {}  # replica_id -> model
        self._status: dict[str, ReplicaStatus] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for event in self._wakeups.values():
            event.set()

    def _pool(self, model: str) -> asyncio.Queue[GenerateRequest]:
        if model not in self._pools:
            self._pools[model] = asyncio.Queue()  # bounded by submit: max_pending over the pool and the direct queues
        return self._pools[model]

    def _wake(self, model: str) -> None:
        for replica_id, pool in self._pool_of.items():
            if pool == model:
                self._wakeups[replica_id].set()

    async def submit(self, request: GenerateRequest, replica_id: str | None = None) -> MemoryResponseStream:
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        stream = MemoryResponseStream(self, request.request_id, self.stream_events)
        pool = self._pool(request.model)
        direct = self._direct.get(replica_id or "")
        if pool.qsize() + sum(map(len, self._direct.values())) >= self.max_pending:
            raise Overloaded(f"{self.max_pending} requests are already waiting for {request.model!r}")
        if direct is not None and self._pool_of[replica_id or ""] == request.model:
            direct.append(request)
        else:
            pool.put_nowait(request)
        self._streams[request.request_id] = stream
        self._wake(request.model)
        return stream

    async def cancel(self, request_id: str, model: str) -> None:
        for replica_id, pool in self._pool_of.items():
            if pool == model:
                self._inboxes[replica_id].append(Cancel(request_id, model))
        self._wake(model)

    def replicas(self) -> list[ReplicaStatus]:
        now = time.time()
        return [s for s in self._status.values() if now - s.sent < self.heartbeat_timeout]

    def _register(self, model: str, replica_id: str) -> None:
        if replica_id not in self._pool_of:
            self._pool_of[replica_id] = model
            self._inboxes[replica_id] = []
            self._direct[replica_id] = deque()
            self._wakeups[replica_id] = asyncio.Event()

    def _drain(self, model: str, replica_id: str, max_requests: int) -> list[WorkMessage]:
        out: list[WorkMessage] = list(self._inboxes[replica_id])
        self._inboxes[replica_id].clear()
        direct, pool = self._direct[replica_id], self._pool(model)
        for _ in range(max_requests):
            if direct:
                out.append(direct.popleft())
            elif not pool.empty():
                out.append(pool.get_nowait())
            else:
                break
        return out

    async def receive(self, model: str, replica_id: str, *, wait: float, max_requests: int) -> list[WorkMessage]:
        self._register(model, replica_id)
        wakeup = self._wakeups[replica_id]
        wakeup.clear()
        out = self._drain(model, replica_id, max_requests)
        if out or wait <= 0:
            return out
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), wait)
        return self._drain(model, replica_id, max_requests)

    async def publish(self, event: ResponseEvent) -> bool:
        stream = self._streams.get(event.request_id)
        if stream is None:
            return False
        delivered = stream.offer(event)
        if isinstance(event, Finished) or not delivered:
            # the stream holds what its consumer still needs; nothing more will be routed to it
            self._streams.pop(event.request_id, None)
        return delivered

    async def heartbeat(self, status: ReplicaStatus) -> None:
        self._register(status.model, status.replica_id)
        self._status[status.replica_id] = status
        if status.state is ReplicaState.STOPPED:  # what was sent to it and not taken, any replica may take
            for request in self._direct.pop(status.replica_id, deque()):
                self._pool(status.model).put_nowait(request)
            self._direct[status.replica_id] = deque()
            self._wake(status.model)
