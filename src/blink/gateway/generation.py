"""One response in the gateway, whatever API asked for it: its events from the replica (or the semantic cache),
as text deltas, its end, its cancel, and its failover to another replica when the one serving it dies.

    generation = await gateway.generate(request)   # (service.py) raises BlinkError if refused
    async for text in generation.deltas(): ...     # then generation.finished says how it ended
    await generation.cancel("client")              # the replica frees the sequence; deltas() then ends
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from blink.bus.base import Bus, ResponseStream
from blink.bus.messages import (
    Accepted,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ResponseEvent,
    TokenEvent,
)
from blink.errors import EngineFailure, from_wire
from blink.gateway.failover import Replay, ReplayMismatch
from blink.gateway.limits import Admission
from blink.semantic_cache.cache import Lookup, SemanticCache
from blink.telemetry.metrics import Metrics
from blink.telemetry.tracing import ResponseTrace

log = logging.getLogger("blink.gateway")

ACCEPT_TIMEOUT_S = 60.0  # a replica tokenizes and answers Accepted within one engine step; this is a dead one
CANCEL_TIMEOUT_S = 10.0
STORE_TIMEOUT_S = 1.0
LIVENESS_CHECK_S = 1.0  # while no event comes, how often a response checks that its replica still lives
FAILOVER_WAIT_S = 30.0  # after its replica died, how long a response waits for another to take the request over
CACHED_DELTA = re.compile(r"\s*\S+(?:\s+\S+){0,3}\s*")  # a cached answer streams a few words per delta


class Host(Protocol):
    """What a generation needs of the gateway that runs it (service.Gateway)."""

    bus: Bus
    cache: SemanticCache | None
    metrics: Metrics

    def accepted(self, request: GenerateRequest, replica_id: str) -> None: ...

    def forget(self, request_id: str) -> None: ...


class CachedStream:
    """A ResponseStream replaying a cached answer: Accepted, the answer in deltas of a few words, Finished."""

    def __init__(self, request_id: str, lookup: Lookup) -> None:
        assert lookup.hit is not None
        self.request_id = request_id
        entry = lookup.hit.entry
        pieces = CACHED_DELTA.findall(entry.answer) or [entry.answer]
        self._events: list[ResponseEvent] = [Accepted(request_id, "cache", prompt_tokens=0)]
        self._events += [TokenEvent(request_id, i, text, 0) for i, text in enumerate(pieces)]
        self._events.append(Finished(request_id, FinishStatus.STOP, completion_tokens=entry.completion_tokens))

    async def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        for event in self._events:
            yield event

    async def close(self) -> None:
        self._events = []


class Generation:
    def __init__(
        self,
        gateway: Host,
        request: GenerateRequest,
        stream: ResponseStream,
        started: float,
        lookup: Lookup | None = None,
    ) -> None:
        self.gateway = gateway
        self.lookup = lookup  # the semantic cache's key and outcome; None: not looked up
        self.request = request
        self.request_id = request.request_id
        self._stream = stream
        self._events = stream.__aiter__()
        self._pending: asyncio.Future[Any] | None = None  # the event being awaited, kept across timeouts
        self.replica_id: str | None = None  # the replica that accepted it ("cache": a cache hit)
        self._gone_since: float | None = None  # when its replica was first missed (monotonic)
        self._replay: Replay | None = None  # after a failover: the regenerated text the client already has
        self.started = started  # monotonic time the client's request arrived
        self.first_delta: float | None = None
        self._last_delta = 0.0
        self._itl: Any = None  # its histogram (labelled by route, known once it is routed)
        self.preloaded = False  # a completed pre-load had prefilled a prefix of its prompt (realtime sets it)
        self.trace: ResponseTrace | None = None  # telemetry/tracing.py; None: not traced
        self.prompt_tokens = 0
        self.finished: Finished | None = None
        self.cancel_reason: str | None = None  # "client", "disconnect", "shutdown"
        self.text_parts: list[str] = []
        self.admission: Admission | None = None  # its place in its tenant's limits, given back when it ends
        # where it is answered: "core" (this gateway's replicas; an edge's link to its core), "edge" (an edge's own
        # replicas) or "cache"; the edge's routing rule that chose it; whether the edge answered for an unreachable core
        self.route = "cache" if self.cache_hit else "core"
        self.rule = ""
        self.degraded = False

    @property
    def done(self) -> bool:
        return self.finished is not None

    async def _next(self, timeout: float | None = None) -> Any:
        """The stream's next event; TimeoutError after `timeout` s, without losing the event still awaited (it
        stays pending for the next call: cancelling the stream's iterator would end it)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._events.__anext__())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done:
            raise TimeoutError
        pending, self._pending = self._pending, None
        return pending.result()

    def _replica_gone(self) -> Finished | None:
        """An error ending this response if the replica serving it stopped (it sent STOPPED, or its heartbeats
        ceased: a killed process) and no other can take it over; None while it lives or a takeover may come."""
        if self.replica_id in (None, "cache"):
            return None
        bus = self.gateway.bus
        statuses = bus.replicas()
        if any(r.replica_id == self.replica_id and r.state is not ReplicaState.STOPPED for r in statuses):
            self._gone_since = None
            return None
        now = time.monotonic()
        self._gone_since = self._gone_since or now
        # another replica of the pool, ready or starting (a replacement), will claim the request and start it again
        able = (ReplicaState.READY, ReplicaState.LOADING, ReplicaState.WARMING)
        others = [r for r in statuses if r.model == self.request.model and r.replica_id != self.replica_id]
        if bus.reclaims and any(r.state in able for r in others) and now - self._gone_since < FAILOVER_WAIT_S:
            return None
        message = f"the replica serving this response ({self.replica_id}) stopped before it finished; retry it"
        return Finished(self.request_id, FinishStatus.ERROR, error_code="engine_failure", error_message=message)

    def _taken_over(self, accepted: Accepted) -> None:
        """Another replica restarted the request (failover): replay its text up to what the client has."""
        log.info("response %s continues on %s (was %s)", self.request_id, accepted.replica_id, self.replica_id)
        self.replica_id = accepted.replica_id
        self._gone_since = None
        self._replay = Replay(self.text)

    async def wait_accepted(self) -> None:
        """Wait for the replica's answer; raise the error it reported (e.g. the prompt is too long)."""
        try:
            event = await self._next(ACCEPT_TIMEOUT_S)
        except TimeoutError:
            await self.cancel("timeout")
            raise EngineFailure("no replica took the request in time") from None
        if isinstance(event, Accepted):
            self.prompt_tokens = event.prompt_tokens
            self.replica_id = event.replica_id
            self.gateway.accepted(self.request, event.replica_id)
        elif isinstance(event, Finished):
            self._end(event)
            if event.status is FinishStatus.ERROR:
                raise from_wire(event.error_code or "", event.error_message or "", event.error_param)

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text as it arrives; return once the response finished (see `finished`)."""
        while not self.done:
            try:
                event = await self._next(LIVENESS_CHECK_S if self.cancel_reason is None else CANCEL_TIMEOUT_S)
            except TimeoutError:
                gone = self._replica_gone() if self.cancel_reason is None else None
                if self.cancel_reason is None and gone is None:
                    continue  # a slow step, or a long prefill: the replica is alive
                self._end(gone or Finished(self.request_id, FinishStatus.CANCELLED))
                return
            except StopAsyncIteration:
                self._end(Finished(self.request_id, FinishStatus.CANCELLED))
                return
            if isinstance(event, TokenEvent):
                text = event.text
                if self._replay is not None:
                    try:
                        text = self._replay.feed(text)
                    except ReplayMismatch as exc:
                        log.warning("response %s could not continue after failover: %s", self.request_id, exc)
                        await self.gateway.bus.cancel(self.request_id, self.request.model)
                        message = "the replica serving this response stopped, and its restart did not match; retry it"
                        self._end(
                            Finished(
                                self.request_id, FinishStatus.ERROR, error_code="engine_failure", error_message=message
                            )
                        )
                        return
                if not text:
                    continue
                now = time.monotonic()
                if self.first_delta is None:
                    self.first_delta = now
                else:
                    if self._itl is None:
                        self._itl = self.gateway.metrics.itl_observer(self.request.model, self.route)
                    self._itl.observe(now - self._last_delta)
                self._last_delta = now
                self.text_parts.append(text)
                yield text
            elif isinstance(event, Accepted) and event.replica_id != self.replica_id:
                self._taken_over(event)
            elif isinstance(event, Finished):
                if event.status is FinishStatus.STOP and self.cancel_reason is None:
                    await self._store(event)
                self._end(event)

    @property
    def cache_hit(self) -> bool:
        return self.lookup is not None and self.lookup.hit is not None

    @property
    def cache_status(self) -> str:
        """hit, miss (looked up, not found) or off (not cacheable, opted out, cache disabled or unavailable)."""
        return "off" if self.lookup is None else "hit" if self.lookup.hit else "miss"

    async def _store(self, finished: Finished) -> None:
        """A completed answer goes into the semantic cache before the client hears it is done, so the next
        request can find it; bounded, and a failure only costs the cache entry."""
        cache = self.gateway.cache
        if self.lookup is None or self.cache_hit or cache is None:
            return
        try:
            await asyncio.wait_for(cache.store(self.lookup, self.text, finished.completion_tokens), STORE_TIMEOUT_S)
        except TimeoutError:
            log.warning("semantic cache: storing %s took over %.1f s; not stored", self.request_id, STORE_TIMEOUT_S)

    async def collect(self) -> str:
        async for _ in self.deltas():
            pass
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    async def cancel(self, reason: str) -> None:
        """Ask the replica to stop; `deltas()` ends when it confirms. The first reason given wins."""
        if self.done or self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if not self.cache_hit:  # a replayed answer is on no replica
            await self.gateway.bus.cancel(self.request_id, self.request.model)

    def _end(self, finished: Finished) -> None:
        self.finished = finished
        self.gateway.forget(self.request_id)
        if self.admission is not None:
            self.admission.done((finished.prompt_tokens or self.prompt_tokens) + finished.completion_tokens)
        if self.trace is not None:
            self._end_trace(finished)
        if self.request.priority == 0:
            self.gateway.metrics.response_done(
                model=self.request.model,
                route=self.route,
                status=finished.status.value,
                cache=self.cache_status,
                preloaded=self.preloaded,
                ttft_s=None if self.first_delta is None else self.first_delta - self.started,
                e2e_s=time.monotonic() - self.started,
                prompt_tokens=finished.prompt_tokens or self.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                cached_tokens=finished.cached_tokens,
            )

    def _end_trace(self, finished: Finished) -> None:
        assert self.trace is not None
        served = self.replica_id not in (None, "cache")
        attributes: dict[str, Any] = {
            "gen_ai.response.id": self.request_id,
            "gen_ai.response.finish_reasons": [finished.status.value],
            "gen_ai.usage.input_tokens": finished.prompt_tokens or self.prompt_tokens,
            "gen_ai.usage.output_tokens": finished.completion_tokens,
            "blink.cache": self.cache_status,
            "blink.preloaded": self.preloaded,
            "blink.cached_tokens": finished.cached_tokens,
            "blink.replica": self.replica_id or "",
            "blink.route": self.route,
        }
        if self.rule:
            attributes["blink.route.rule"] = self.rule
        if self.degraded:
            attributes["blink.degraded"] = True
        if self.first_delta is not None:
            attributes["blink.ttft_ms"] = round((self.first_delta - self.started) * 1000, 3)
        if finished.error_code:
            attributes["error.type"] = finished.error_code
        self.trace.end(attributes, finished.created if served else None)

    async def close(self) -> None:
        """Release the stream; if the response is still running, cancel it (the client went away)."""
        if not self.done:
            await self.cancel("disconnect")
            self.gateway.forget(self.request_id)
            if self.admission is not None:  # its end will not be seen: count what it used so far
                self.admission.done(self.prompt_tokens + len(self.text_parts))
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        await self._stream.close()

    def timings(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = dict(self.finished.timings) if self.finished else {}
        out.update(self.lookup.timings() if self.lookup else {"cache": "off"})
        if self.first_delta is not None:
            out["ttft_ms"] = round((self.first_delta - self.started) * 1000, 3)
        out["total_ms"] = round((now - self.started) * 1000, 3)
        out["route"] = self.route
        if self.rule:
            out["route_rule"] = self.rule
        if self.degraded:
            out["degraded"] = True
        return out
