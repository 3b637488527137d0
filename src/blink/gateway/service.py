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
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, Protocol

from blink.bus.base import Bus
from blink.bus.messages import (
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
)
from blink.config import GatewayConfig
from blink.errors import (
    BlinkError,
    ModelNotFound,
    NotReady,
    Overloaded,
    ShuttingDown,
)
from blink.gateway.generation import CachedStream, Generation
from blink.gateway.keys import Authenticator, OpenAccess, Tenant
from blink.gateway.limits import Admission, Limiter
from blink.gateway.resume import Responses
from blink.gateway.sessions import MemorySessions, SessionStore
from blink.preload.store import TenantStores
from blink.semantic_cache.cache import SemanticCache
from blink.telemetry import tracing
from blink.telemetry.metrics import Metrics

log = logging.getLogger("blink.gateway")

AFFINITY_SLACK_S = 1.0  # queue wait a replica holding the prefix may have over the least-loaded one and still get it
REMEMBERED_AFFINITIES = 10_000


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


class Decision(Protocol):
    """Where a router sent a request (edge/policy.py's Decision)."""

    @property
    def model(self) -> str: ...  # the model that answers it

    @property
    def route(self) -> str: ...  # "edge" (this gateway's replicas) or "core" (over an edge's link)

    @property
    def rule(self) -> str: ...  # the routing rule that chose it ("" when the request named its model)

    @property
    def degraded(self) -> bool: ...  # answered here where the core's answer was wanted (the core is unreachable)


class Router(Protocol):
    """An edge's routing (edge/router.py): where a request goes after the semantic cache missed. A gateway
    without one answers everything from its own replicas, as route "core"."""

    @property
    def local_model(self) -> str: ...  # the model of the edge's own replicas: it is ready when they are

    def decide(self, request: GenerateRequest) -> Decision: ...


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
        router: Router | None = None,
    ) -> None:
        self.bus = bus
        self.router = router
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this gateway can answer now (a warmed replica, the semantic cache's embedder loaded, not
        shutting down), and what /readyz shows: every replica's heartbeat, the active responses, the cache."""
        replicas = [_replica_view(r) for r in self.bus.replicas()]
        cache_ready = self.cache is None or self.cache.ready  # its embedder loads beside the model
        own = self.ready_replicas(self.router.local_model if self.router is not None else None)  # not a core's
        ready = bool(own) and cache_ready and not self.shutting_down
        return ready, {
            "status": "ready" if ready else "not_ready",
            "replicas": replicas,
            "active_responses": self.num_active,
            "semantic_cache": self.cache.snapshot() if self.cache is not None else None,
        }

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
        decision = _decide(self.router, request, self.metrics)
        request = request if decision is None else dataclasses.replace(request, model=decision.model)
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
        if decision is not None:  # where an edge's router sent it
            generation.route, generation.rule, generation.degraded = decision.route, decision.rule, decision.degraded
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

    def forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        if not self._active:
            self._idle.set()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_live(self) -> int:
        """Live generations this gateway's replicas compute (not pre-loads, nor what an edge forwards to its core)."""
        edge = self.router is not None
        return sum(1 for g in self._active.values() if g.request.priority == 0 and not (edge and g.route == "core"))

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


def _decide(router: Router | None, request: GenerateRequest, metrics: Metrics) -> Decision | None:
    """Where an edge's router sends a request (counted when live); None without a router."""
    if router is None:
        return None
    decision = router.decide(request)
    if request.priority == 0:
        metrics.routes.labels(decision.route, decision.rule or "named").inc()
    return decision


def gateway_of(conn: Any) -> Gateway:
    """The gateway of a request's or WebSocket's app (create_app puts it in `app.state`)."""
    gateway: Gateway = conn.app.state.gateway
    return gateway


def _replica_view(r: ReplicaStatus) -> dict[str, Any]:
    """A replica's heartbeat as /readyz shows it."""
    return {
        "id": r.replica_id,
        "model": r.model,
        "state": r.state.value,
        "running": r.running,
        "waiting": r.waiting,
        "queue_wait_s": r.queue_wait_s,
        "kv_blocks_in_use": r.kv_blocks_in_use,
        "kv_blocks_total": r.kv_blocks_total,
        "background_prefill_tokens": r.background_prefill_tokens,
        "background_tokens_used": r.background_tokens_used,
        "interrupted_steps": r.interrupted_steps,
        "parked": r.parked,
        "speculative": {"mode": r.speculative, "proposed": r.spec_proposed, "accepted": r.spec_accepted},
        "memory": {"architecture": r.architecture, "weights_mib": r.weights_mib, "kv_cache_mib": r.kv_cache_mib},
        "heartbeat_at": r.sent,
    }
