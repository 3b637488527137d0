"""The gateway's core, shared by every API: admit a request, stream its text, cancel it, drain on shutdown.

    generation = await gateway.generate(request)   # raises BlinkError (bad input, not ready, overloaded)
    async for text in generation.deltas(): ...     # then generation.finished says how it ended
    await generation.cancel("client")              # the replica frees the sequence; deltas() then ends

Every generation is registered until it ends, so `shutdown()` can end them all with status incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

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
from blink.config import GatewayConfig
from blink.errors import (
    BlinkError,
    EngineFailure,
    ModelNotFound,
    NotReady,
    Overloaded,
    ShuttingDown,
    from_wire,
)
from blink.gateway.failover import Replay, ReplayMismatch
from blink.gateway.keys import Authenticator, OpenAccess, Tenant
from blink.gateway.limits import Admission, Limiter
from blink.gateway.resume import Responses
from blink.gateway.sessions import MemorySessions, SessionStore
from blink.preload.store import TenantStores
from blink.semantic_cache.cache import Lookup, SemanticCache
from blink.telemetry import tracing
from blink.telemetry.metrics import Metrics
from blink.telemetry.tracing import ResponseTrace

log = logging.getLogger("blink.gateway")

ACCEPT_TIMEOUT_S = 60.0  # a replica tokenizes and answers Accepted within one engine step; this is a dead one
CANCEL_TIMEOUT_S = 10.0
STORE_TIMEOUT_S = 1.0
LIVENESS_CHECK_S = 1.0  # while no event comes, how often a response checks that its replica still lives
AFFINITY_SLACK_S = 1.0  # queue wait a replica holding the prefix may have over the least-loaded one and still get it
REMEMBERED_AFFINITIES = 10_000
FAILOVER_WAIT_S = 30.0  # after its replica died, how long a response waits for another to take the request over
CACHED_DELTA = re.compile(r"\s*\S+(?:\s+\S+){0,3}\s*")  # a cached answer streams a few words per delta


def affinity_key(request: GenerateRequest) -> str:
    """What names a request's prompt prefix for routing: its realtime session, else its first two messages (the
    system prompt and first turn of a conversation resent whole each turn), else the head of its prompt."""
    if request.session_id is not None:
        return f"s:{request.session_id}"
    head = json.dumps(request.messages[:2], sort_keys=True) if request.messages else (request.prompt or "")[:512]
    # the tenant is part of the name: prefixes are cached per tenant, so another tenant's holder holds nothing
    return "p:" + hashlib.sha256(f"{request.tenant}\n{request.model}\n{head}".encode()).hexdigest()[:16]


def _request_attributes(request: GenerateRequest) -> dict[str, Any]:
    """GenAI semantic-convention attributes of a request (the response's root span)."""
    s = request.sampling
    out: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.messages is not None else "text_completion",
        "gen_ai.provider.name": "blink",
        "gen_ai.request.model": request.model,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
        "blink.request.id": request.request_id,
    }
    if s.max_tokens is not None:
        out["gen_ai.request.max_tokens"] = s.max_tokens
    if s.seed is not None:
        out["gen_ai.request.seed"] = s.seed
    if request.session_id is not None:
        out["session.id"] = request.session_id
    return out


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
        gateway: Gateway,
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
        self._itl = gateway.metrics.itl_observer(request.model)
        self.preloaded = False  # a completed pre-load had prefilled a prefix of its prompt (realtime sets it)
        self.trace: ResponseTrace | None = None  # telemetry/tracing.py; None: not traced
        self.prompt_tokens = 0
        self.finished: Finished | None = None
        self.cancel_reason: str | None = None  # "client", "disconnect", "shutdown"
        self.text_parts: list[str] = []
        self.admission: Admission | None = None  # its place in its tenant's limits, given back when it ends

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
        self.gateway._forget(self.request_id)
        if self.admission is not None:
            self.admission.done((finished.prompt_tokens or self.prompt_tokens) + finished.completion_tokens)
        if self.trace is not None:
            self._end_trace(finished)
        if self.request.priority == 0:
            self.gateway.metrics.response_done(
                model=self.request.model,
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
        }
        if self.first_delta is not None:
            attributes["blink.ttft_ms"] = round((self.first_delta - self.started) * 1000, 3)
        if finished.error_code:
            attributes["error.type"] = finished.error_code
        self.trace.end(attributes, finished.created if served else None)

    async def close(self) -> None:
        """Release the stream; if the response is still running, cancel it (the client went away)."""
        if not self.done:
            await self.cancel("disconnect")
            self.gateway._forget(self.request_id)
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
        return out


class Gateway:
    def __init__(
        self,
        bus: Bus,
        config: GatewayConfig,
        models: list[str],
        store: TenantStores | None = None,
        cache: SemanticCache | None = None,
        session_store: SessionStore | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.bus = bus
        self.auth: Authenticator = auth or OpenAccess()  # who a key belongs to (gateway/keys.py)
        self.limits = Limiter()  # each tenant's use of its limits (gateway/limits.py)
        self.config = config
        self.store = store  # each tenant's documents for retrieval (preload/store.py); None: no /v1/documents
        self.cache = cache  # the semantic cache; None: disabled
        self.sessions: dict[str, Any] = {}  # realtime sessions by id, while their connection is open
        self.session_store: SessionStore = session_store or MemorySessions(config.session_ttl_s)
        self.responses = Responses(self.background, config.resume_window_s)  # streamed responses, resumable for a while
        self.metrics = Metrics(bus.replicas, self._unaccepted)
        self.models = models
        self.default_model = models[0]
        self._active: dict[str, Generation] = {}
        self._affinity: OrderedDict[str, str] = OrderedDict()  # affinity key -> replica that took it last
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self._idle = asyncio.Event()  # set whenever no generation is active
        self._idle.set()

    def ready_replicas(self, model: str | None = None) -> list[Any]:
        return [r for r in self.bus.replicas() if r.state is ReplicaState.READY and (model is None or r.model == model)]

    @property
    def has_documents(self) -> bool:
        return self.store is not None

    def max_model_len(self, model: str) -> int:
        lengths = [r.max_model_len for r in self.ready_replicas(model)]
        return min(lengths) if lengths else 1 << 20

    def check_model(self, model: str, param: str = "model") -> None:
        """Raise ModelNotFound unless this gateway serves `model` (a property of the request, not of the moment)."""
        if model not in self.models:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {', '.join(self.models)}", param=param
            )

    def check_ready(self, model: str) -> None:
        """Raise NotReady unless a replica of `model` can take work now. Call it after validating the request,
        so a malformed request is a 400 whatever the replicas' state."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        if not self.ready_replicas(model):
            raise NotReady(f"no replica of {model!r} is ready yet; retry shortly")

    def route(self, request: GenerateRequest) -> str | None:
        """The replica that holds the request's prefix (its heartbeats list the affinity key, or it took this
        key's last request through this gateway), unless it is busier than the least-loaded replica by more than
        AFFINITY_SLACK_S of queue wait; None: the pool, which the first replica with batch room reads."""
        ready = self.ready_replicas(request.model)
        key = request.affinity
        if key is None or len(ready) < 2:
            return None
        hinted = self._affinity.get(key)
        holders = [r for r in ready if key in r.prefixes or r.replica_id == hinted]
        if not holders:
            return None
        best = min(holders, key=lambda r: (r.queue_wait_s, r.running + r.waiting))
        if best.queue_wait_s > min(r.queue_wait_s for r in ready) + AFFINITY_SLACK_S:
            return None
        return str(best.replica_id)

    def accepted(self, request: GenerateRequest, replica_id: str) -> None:
        """Remember which replica took a request's prefix (it is in that replica's cache from now on)."""
        if request.affinity is None or replica_id == "cache":
            return
        self._affinity[request.affinity] = replica_id
        self._affinity.move_to_end(request.affinity)
        while len(self._affinity) > REMEMBERED_AFFINITIES:
            self._affinity.popitem(last=False)

    def check_load(self, model: str) -> None:
        """Raise Overloaded when every ready replica of `model` estimates a new request would wait past
        --first-token-deadline-s for its first token (heartbeats carry the estimate: worker/load.py)."""
        limit = self.config.first_token_deadline_s
        waits = [r.queue_wait_s for r in self.ready_replicas(model)]
        if limit <= 0 or not waits or min(waits) <= limit:
            return
        error = Overloaded(
            f"every replica of {model!r} is saturated: a new request would wait about {min(waits):.1f} s for its "
            f"first token, over this server's {limit:g} s; retry later"
        )
        error.retry_after = min(waits) - limit
        raise error

    async def generate(
        self,
        request: GenerateRequest,
        *,
        started: float | None = None,
        tenant: Tenant | None = None,
        use_cache: bool = True,
        traceparent: str | None = None,
    ) -> Generation:
        """Answer a validated request from the semantic cache (`tenant`'s entries only; `use_cache` False skips
        it), or else submit it, as `tenant`'s (its prefix-cache partition and batch share), and wait for a replica
        to accept it. A live request (priority 0) counts against the tenant's limits (RateLimited when over);
        None: the open server's tenant.
        `traceparent`: the client's W3C trace context, the parent of the response's trace (when tracing is on)."""
        self.check_model(request.model)
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        started = started or time.monotonic()
        tenant = tenant or OpenAccess().tenant
        request = dataclasses.replace(request, tenant=tenant.name)
        admission = self.limits.admit(tenant) if request.priority == 0 else None
        try:
            return await self._generate(request, started, tenant, admission, use_cache, traceparent)
        except BaseException:
            if admission is not None:
                admission.done(0)
            raise

    async def _generate(
        self,
        request: GenerateRequest,
        started: float,
        tenant: Tenant,
        admission: Admission | None,
        use_cache: bool,
        traceparent: str | None,
    ) -> Generation:
        trace = (
            tracing.start_response(started, _request_attributes(request), traceparent)
            if request.priority == 0
            else None
        )
        if trace is not None and self.cache is not None and use_cache:
            trace.mark("lookup_start")
        lookup = (
            await self.cache.lookup(tenant.name, request, tenant.limits.cache_entries)
            if self.cache is not None and use_cache
            else None
        )
        if lookup is not None:
            self.metrics.cache_lookups.labels("hit" if lookup.hit is not None else "miss").inc()
            if trace is not None:
                trace.mark("lookup_end")
                similarity = lookup.hit.similarity if lookup.hit is not None else None
                trace.lookup_attributes = {"blink.cache.hit": lookup.hit is not None} | (
                    {"blink.cache.similarity": similarity} if similarity is not None else {}
                )
        if lookup is not None and lookup.hit is not None:  # served even while no replica is ready
            generation = Generation(self, request, CachedStream(request.request_id, lookup), started, lookup)
            generation.trace, generation.admission = trace, admission
            self._active[request.request_id] = generation
            self._idle.clear()
            await generation.wait_accepted()
            return generation
        self.check_ready(request.model)
        if request.priority == 0:
            self.check_load(request.model)
        if request.deadline is None:  # nobody waits longer than this: a replica drops it once it passes
            request = dataclasses.replace(request, deadline=time.time() + self.config.request_timeout_s)
        if request.affinity is None:
            request = dataclasses.replace(request, affinity=affinity_key(request))
        if trace is not None:
            request = dataclasses.replace(request, traceparent=trace.traceparent, submitted=trace.mark("submitted"))
        stream = await self.bus.submit(request, self.route(request))
        generation = Generation(self, request, stream, started, lookup)
        generation.trace, generation.admission = trace, admission
        self._active[request.request_id] = generation
        self._idle.clear()
        try:
            await generation.wait_accepted()
        except BaseException:
            await generation.close()
            raise
        return generation

    def _unaccepted(self) -> dict[str, int]:
        """Live requests submitted and not yet accepted by a replica, by model (they wait on the bus)."""
        out: dict[str, int] = {}
        for g in self._active.values():
            if g.replica_id is None and g.request.priority == 0:
                out[g.request.model] = out.get(g.request.model, 0) + 1
        return out

    def _forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        if not self._active:
            self._idle.set()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_live(self) -> int:
        """Active generations a user is waiting on (not background work such as pre-loads)."""
        return sum(1 for g in self._active.values() if g.request.priority == 0)

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` detached (e.g. a cleanup from a cancelled task), keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Refuse new work, cancel every running generation (they end as incomplete), wait for them."""
        self.shutting_down = True
        active = list(self._active.values())
        log.info("shutting down: %d response(s) in flight", len(active))
        for generation in active:
            with contextlib.suppress(BlinkError):
                await generation.cancel("shutdown")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.shutdown_grace_s)
        with contextlib.suppress(TimeoutError):  # and each connected client has its response's closing events
            await asyncio.wait_for(self.responses.close(), 2.0)
