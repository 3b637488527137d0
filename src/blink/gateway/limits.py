"""Per-tenant limits at the gateway (TenantLimits in config.py, set per tenant in the keys file).

    admission = limits.admit(tenant)    # RateLimited (429 + Retry-After) when a limit would be passed
    ... the response runs ...
    admission.done(tokens)              # its concurrency slot back, its prompt + completion tokens counted

Rates are token buckets refilled continuously: a limit of N per minute holds up to N and refills N/60 a second,
so a burst of N passes and then the rate holds. A response's tokens are known only as it runs, so the tokens bucket
is charged when it ends and may go below zero; new requests then wait until it is above zero again (as OpenAI's
token limits behave). Sessions and concurrent responses are counted while they are open. `headers` and
`rate_limits` report the state in OpenAI's shapes (`x-ratelimit-*` headers, the realtime `rate_limits.updated`).

Everything here is O(1) per request and holds one small record per tenant that ever came (tenants come from the
keys file, so their number is the operator's).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from blink.config import TenantLimits
from blink.errors import Overloaded, RateLimited
from blink.gateway.keys import Tenant
from blink.gateway.wire import error_response

Clock = Callable[[], float]


@dataclass
class Bucket:
    per_minute: float  # refill rate; 0: no limit
    burst: float = 0.0  # what it holds when full; 0: a minute's worth
    level: float = math.nan  # NaN: full (set on first use)
    at: float = 0.0

    def refill(self, now: float) -> float:
        full = self.burst or self.per_minute
        if math.isnan(self.level):
            self.level, self.at = full, now
        self.level = min(full, self.level + (now - self.at) * self.per_minute / 60.0)
        self.at = now
        return self.level

    def wait_s(self, need: float, now: float) -> float:
        """Seconds until the bucket holds `need` (0: now)."""
        return max(0.0, (need - self.refill(now)) * 60.0 / self.per_minute)


@dataclass
class Usage:
    """One tenant's counters."""

    requests: Bucket
    tokens: Bucket
    responses: int = 0
    sessions: int = 0
    limits: TenantLimits = field(default_factory=TenantLimits)


class Admission:
    """A live request let in: `done(tokens)` once, when it ends (later calls do nothing)."""

    def __init__(self, usage: Usage, clock: Clock) -> None:
        self._usage = usage
        self._clock = clock
        self._open = True

    def done(self, tokens: int) -> None:
        if not self._open:
            return
        self._open = False
        self._usage.responses -= 1
        if self._usage.tokens.per_minute:
            self._usage.tokens.refill(self._clock())
            self._usage.tokens.level -= tokens


class Limiter:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._usage: dict[str, Usage] = {}

    def _of(self, tenant: Tenant) -> Usage:
        usage = self._usage.get(tenant.name)
        limits = tenant.limits
        if usage is None:
            usage = Usage(Bucket(limits.requests_per_minute), Bucket(limits.tokens_per_minute))
            self._usage[tenant.name] = usage
        if usage.limits != limits:  # the keys file changed them
            usage.limits = limits
            usage.requests.per_minute, usage.tokens.per_minute = limits.requests_per_minute, limits.tokens_per_minute
        return usage

    def admit(self, tenant: Tenant) -> Admission:
        """Let a live request of `tenant` in, or raise RateLimited saying which limit and for how long."""
        usage, limits, now = self._of(tenant), tenant.limits, self._clock()
        if limits.max_concurrent_responses and usage.responses >= limits.max_concurrent_responses:
            raise RateLimited(
                f"this key's tenant has {usage.responses} responses running, its limit; wait for one to end",
                kind="concurrent_responses",
                retry_after=1.0,
            )
        if limits.requests_per_minute and (wait := usage.requests.wait_s(1.0, now)) > 0:
            raise RateLimited(
                f"rate limit reached: {limits.requests_per_minute} requests per minute; retry in {wait:.1f} s",
                kind="requests",
                retry_after=wait,
            )
        if limits.tokens_per_minute and (wait := usage.tokens.wait_s(1.0, now)) > 0:
            raise RateLimited(
                f"rate limit reached: {limits.tokens_per_minute} tokens per minute; retry in {wait:.1f} s",
                kind="tokens",
                retry_after=wait,
            )
        if limits.requests_per_minute:
            usage.requests.level -= 1
        usage.responses += 1
        return Admission(usage, self._clock)

    def open_session(self, tenant: Tenant) -> None:
        """Count a connected realtime session of `tenant`, or raise RateLimited at its limit."""
        usage, limit = self._of(tenant), tenant.limits.max_sessions
        if limit and usage.sessions >= limit:
            raise RateLimited(
                f"this key's tenant has {usage.sessions} realtime sessions connected, its limit; close one first",
                kind="sessions",
                retry_after=1.0,
            )
        usage.sessions += 1

    def close_session(self, tenant: Tenant) -> None:
        self._of(tenant).sessions -= 1

    def rate_limits(self, tenant: Tenant) -> list[dict[str, Any]]:
        """[{name, limit, remaining, reset_seconds}] of the tenant's per-minute limits (the realtime
        `rate_limits.updated` event); empty when it has none."""
        usage, now, out = self._of(tenant), self._clock(), []
        for name, bucket in (("requests", usage.requests), ("tokens", usage.tokens)):
            if bucket.per_minute:
                level = bucket.refill(now)
                reset = (bucket.per_minute - level) * 60.0 / bucket.per_minute  # until full again
                out.append(
                    {
                        "name": name,
                        "limit": int(bucket.per_minute),
                        "remaining": max(0, math.floor(level)),
                        "reset_seconds": round(reset, 3),
                    }
                )
        return out

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers."""
        out = {}
        for limit in self.rate_limits(tenant):
            name = limit["name"]
            out[f"x-ratelimit-limit-{name}"] = str(limit["limit"])
            out[f"x-ratelimit-remaining-{name}"] = str(limit["remaining"])
            out[f"x-ratelimit-reset-{name}"] = f"{limit['reset_seconds']:g}s"
        return out


class Coalescer:
    """Runs the latest of a stream of calls at most `per_second` times a second: a call over the rate replaces the
    one waiting (at most one waits, so nothing queues without bound) and runs when the rate allows. 0: no limit."""

    def __init__(self, per_second: float, clock: Clock = time.monotonic) -> None:
        self._bucket = Bucket(per_second * 60.0, burst=max(1.0, per_second))  # a second's worth at once
        self._clock = clock
        self._waiting: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.coalesced = 0  # calls replaced before they ran

    def offer(self, call: Callable[[], None]) -> None:
        if not self._bucket.per_minute:
            call()
            return
        wait = self._bucket.wait_s(1.0, self._clock())
        if wait == 0 and self._waiting is None:
            self._bucket.level -= 1
            call()
            return
        if self._waiting is not None:
            self.coalesced += 1
        self._waiting = call
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self._timer = None
        call, self._waiting = self._waiting, None
        if call is not None:
            self.offer(call)

    def close(self) -> None:
        """Drop the waiting call (the session ended)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting = None, None


class ConnectionCap:
    """Pure ASGI: at most `limit` HTTP requests and WebSockets open at once, over all tenants (0: no cap). One
    more gets 429 overloaded (a WebSocket: as its handshake's response), before anything else runs."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.limit and self.open >= self.limit:
            error = Overloaded(f"this server has {self.open} connections open, its limit; retry shortly")
            if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1013, "reason": error.message})
                return
            await error_response(error)(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
