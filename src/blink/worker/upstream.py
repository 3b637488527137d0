"""A replica whose engine streams (engines/base.py's StreamingEngine: an OpenAI-compatible upstream today): the
same bus protocol as worker/replica.py's (Accepted, TokenEvents, one Finished; Cancel; heartbeats; hand-back when
it stops on a bus that re-delivers), one task per request instead of blink's step loop.

    LOADING (the engine starts: the upstream answers) ──▶ READY ──▶ DRAINING ──▶ STOPPED

A heartbeat while the engine does not answer says LOADING, so gateways route around it until it does again. Its
figures are the engine's own (EngineLoad); its prefixes, the affinity keys of the requests served last (an
upstream's prefix cache cannot be asked which it still holds, and likely holds the newest).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import OrderedDict

from blink.bus.base import Bus
from blink.bus.messages import (
    Accepted,
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    TokenEvent,
)
from blink.worker.engines.base import Delta, End, StreamingEngine
from blink.worker.status import HEARTBEAT_PREFIXES

log = logging.getLogger("blink.worker")

REMEMBERED_CANCELS = 10_000
REMEMBERED_PREFIXES = 256  # affinity keys of the requests served last: the upstream's prefix cache likely holds them


class UpstreamReplica:
    def __init__(
        self,
        bus: Bus,
        engine: StreamingEngine,
        model_name: str,
        *,
        replica_id: str | None = None,
        max_concurrent: int = 64,
        heartbeat_s: float = 1.0,
    ) -> None:
        """`model_name`: the pool on the bus (the name clients use); `max_concurrent`: requests in flight at
        most (the rest waits on the bus, where another replica may take it)."""
        self.bus, self.engine, self.model_name = bus, engine, model_name
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self.max_concurrent, self.heartbeat_s = max_concurrent, heartbeat_s
        self.state = ReplicaState.LOADING
        self.ready = asyncio.Event()
        self._healthy = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._requests: dict[str, GenerateRequest] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        # requests being cancelled or handed back: each ends at its next event even where the task's cancel is lost
        # (measured: with --engine openai, now and then a task.cancel() never arrived and the stream ran to its end)
        self._ending: set[str] = set()
        self._prefixes: OrderedDict[str, None] = OrderedDict()  # newest last
        self._preloaded_tokens = 0  # prompt tokens pre-loads had the engine compute, since start
        self._stopping = asyncio.Event()
        self._drain_until = 0.0

    async def run(self) -> None:
        """Start the engine, serve until `stop()`. Raises if the engine cannot start."""
        await self._heartbeat()
        beat = asyncio.create_task(self._beat())
        try:
            await self.engine.start()
            self._healthy = True
            await self._set_state(ReplicaState.READY)
            self.ready.set()
            await self._loop()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self._release()
            await self.engine.close()
            self.state = ReplicaState.STOPPED
            await self._heartbeat()

    async def stop(self, drain_s: float = 0.0) -> None:
        """As Replica.stop: take no more work, finish what runs for up to `drain_s` s, then hand back or cancel."""
        self._drain_until = time.monotonic() + drain_s
        if self.state is ReplicaState.READY:
            await self._set_state(ReplicaState.DRAINING)
        self._stopping.set()

    async def _set_state(self, new: ReplicaState) -> None:
        self.state = new
        log.info("replica %s: %s", self.replica_id, new.value)
        await self._heartbeat()

    async def _heartbeat(self) -> None:
        load = self.engine.load()
        state = self.state
        if state is ReplicaState.READY and not self._healthy:
            state = ReplicaState.LOADING  # its engine does not answer: no gateway routes to it meanwhile
        status = ReplicaStatus(
            replica_id=self.replica_id,
            model=self.model_name,
            state=state,
            running=load.running,
            waiting=load.waiting,
            max_model_len=load.max_model_len,
            kv_blocks_in_use=load.kv_blocks_in_use,
            kv_blocks_total=load.kv_blocks_total,
            speculative=load.speculative,
            spec_proposed=load.spec_proposed,
            spec_accepted=load.spec_accepted,
            prefixes=tuple(reversed(self._prefixes))[:HEARTBEAT_PREFIXES],
            background_prefill_tokens=self._preloaded_tokens,
        )
        await self.bus.heartbeat(status)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.state is ReplicaState.READY:
                self._healthy = await self.engine.healthy()
            await self._heartbeat()

    async def _loop(self) -> None:
        while not self._stopping.is_set() or (self._tasks and time.monotonic() < self._drain_until):
            room = 0 if self._stopping.is_set() else max(0, self.max_concurrent - len(self._tasks))
            for msg in await self.bus.receive(self.model_name, self.replica_id, wait=0.2, max_requests=room):
                if isinstance(msg, Cancel):
                    await self._cancel(msg.request_id)
                elif msg.request_id in self._cancelled or msg.predecode:
                    # pre-decode needs blink's engine (a sequence held between requests): an upstream has none
                    await self.bus.publish(Finished(msg.request_id, FinishStatus.CANCELLED))
                else:
                    task = asyncio.create_task(self._serve(msg))
                    self._tasks[msg.request_id], self._requests[msg.request_id] = task, msg
                    task.add_done_callback(functools.partial(self._forget, msg.request_id))

    def _forget(self, request_id: str, _: object = None) -> None:
        self._tasks.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._ending.discard(request_id)

    async def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is None:  # it may still be on its way to us
            self._cancelled[request_id] = None
            while len(self._cancelled) > REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)
            return
        self._ending.add(request_id)
        if not task.cancel():  # it ended already and published its own Finished
            return
        with contextlib.suppress(asyncio.CancelledError):  # the stream closes: the upstream frees the request
            await task
        await self.bus.publish(Finished(request_id, FinishStatus.CANCELLED))

    async def _serve(self, req: GenerateRequest) -> None:
        if not await self.bus.publish(Accepted(req.request_id, self.replica_id, 0)):
            return
        started = time.monotonic()
        end: End | None = None
        events, first = 0, 0.0
        stream = self.engine.stream(req)
        try:
            async with asyncio.timeout(None if req.deadline is None else max(0.0, req.deadline - time.time())):
                async for item in stream:
                    if req.request_id in self._ending:  # cancelled, though the cancel did not reach this task
                        raise asyncio.CancelledError
                    if isinstance(item, End):
                        end = item
                        break
                    if not isinstance(item, Delta) or not item.text:
                        continue
                    first = first or time.monotonic()
                    event = TokenEvent(req.request_id, events, item.text, item.completion_tokens)
                    events += 1
                    if not await self.bus.publish(event):  # a vanished client: free the upstream's request
                        end = End(FinishStatus.CANCELLED)
                        break
        except TimeoutError:
            end = End(
                FinishStatus.ERROR,
                error_code="deadline_exceeded",
                error_message="the request's deadline passed before it finished",
            )
        finally:
            await stream.aclose()
        end = end or End(
            FinishStatus.ERROR, error_code="engine_failure", error_message="the engine's stream ended early"
        )
        if req.prefill_only and end.status is FinishStatus.STOP:  # prompt tokens the pre-load had computed
            self._preloaded_tokens += max(0, end.prompt_tokens - end.cached_tokens)
        if req.affinity is not None and end.status in (FinishStatus.STOP, FinishStatus.LENGTH):
            self._prefixes[req.affinity] = None  # its prompt went through the upstream's prefix cache just now
            self._prefixes.move_to_end(req.affinity)
            while len(self._prefixes) > REMEMBERED_PREFIXES:
                self._prefixes.popitem(last=False)
        now = time.monotonic()
        timings = {"prefill_ms": round(((first or now) - started) * 1000, 1)}
        if first:
            timings["decode_ms"] = round((now - first) * 1000, 1)
        await self.bus.publish(
            Finished(
                req.request_id,
                end.status,
                prompt_tokens=end.prompt_tokens,
                completion_tokens=end.completion_tokens,
                cached_tokens=end.cached_tokens,
                timings=timings,
                error_code=end.error_code,
                error_message=end.error_message,
                error_param=end.error_param,
            )
        )

    async def _release(self) -> None:
        """The requests still running when the replica stops: handed back without a word where the bus
        re-delivers them (another replica continues each; pre-loads, not worth a restart, end cancelled), else
        ended as cancelled."""
        hand_back = self.bus.reclaims and self._stopping.is_set()
        handed = 0
        for request_id, task in list(self._tasks.items()):
            request = self._requests[request_id]
            self._ending.add(request_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if hand_back and not request.prefill_only:
                handed += 1
            else:
                await self.bus.publish(Finished(request_id, FinishStatus.CANCELLED))
        if handed:
            log.info("replica %s: handed back %d request(s) to the pool", self.replica_id, handed)
