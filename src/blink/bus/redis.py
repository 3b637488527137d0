"""The scale-out transport: Redis Streams (Redis >= 8.0), shared by any number of gateways and replicas.

The key layout is in redis_wire.py; the replica's reading side in redis_work.py. Round trips: submit, cancel and
publish take one each (a Finished one more, to acknowledge the request); a response reader's next batch one
(deleting what it consumed rides along). A replica's XREADGROUP and a gateway's XREAD BLOCK are served by Redis
as soon as the entry is written, so no step of the token path waits for a polling interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from blink.bus import redis_scripts
from blink.bus.messages import (
    Accepted,
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaStatus,
    ResponseEvent,
    TokenEvent,
    WorkMessage,
)
from blink.bus.redis_claim import Claimer
from blink.bus.redis_wire import (
    CANCEL_KEEP,
    ERRORS,
    FIELD,
    GROUP,
    Health,
    Keys,
    blocking_client,
    client,
    encode,
    entries,
    parse,
    redact,
    slow_consumer,
)
from blink.bus.redis_work import WorkReader
from blink.errors import NotReady, Overloaded

T = TypeVar("T")

log = logging.getLogger("blink.bus")

READ_BLOCK_MS = 2000  # a response reader's block: how soon it notices its stream was closed
READ_COUNT = 64  # entries per response read
REFRESH_S = 0.5  # how stale replicas() may be for replicas heard through Redis


class RedisBus:
    """A Bus over Redis Streams. Every gateway and replica process makes its own on the same URL and prefix.

    Failures: submit and cancel raise NotReady while Redis is unreachable (within about timeout_s); publish
    returns False (the replica drops the request, as for a gone reader); receive and heartbeat log an outage once,
    back off and return (receive: nothing), so a replica's loop outlives it; a response stream retries and, after
    heartbeat_timeout seconds of outage, ends with Finished(ERROR, model_not_ready). A malformed entry (bad JSON,
    unknown kind, newer version) is logged and dropped (a request is acknowledged), never raised.
    Nothing in flight is dropped silently by an outage: a response whose publish failed may lack that event, so it
    gets nothing more but a Finished(ERROR, model_not_ready) in place of the replica's own, and a Finished that
    could not be sent is sent by a later heartbeat once Redis answers (the state key keeps it from landing twice).
    A Redis that restarted empty has lost every response: its reader notices the state key is gone (within
    READ_BLOCK_MS) and ends it with Finished(ERROR, model_not_ready); consumer groups are made again on use, and
    `replicas()` keeps a replica missing from the emptied hash until its last heartbeat is stale.
    `replicas()` shows this process's heartbeats at once and others' within REFRESH_S once `start()` ran.

    Failover (`reclaims`): the requests a dead replica had taken and not finished (its heartbeat older than
    heartbeat_timeout, missing, or STOPPED) are claimed by a live READY replica of the pool within claim_interval_s
    of its next receive, and come out of that receive like new ones (redis_claim.py); those whose response is no
    longer open are acknowledged instead. The new replica publishes into the same response, from Accepted on.
    """

    reclaims: bool = True
    step_poll_s: float = 0.01  # a look is a round trip to Redis

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        max_pending: int = 256,
        stream_events: int = 1024,
        heartbeat_timeout: float = 10.0,
        claim_interval_s: float = 1.0,
        prefix: str = "blink:bus",
        response_ttl_s: float = 600.0,
        timeout_s: float = 1.0,
    ) -> None:
        if max_pending < 1 or stream_events < 1:
            raise ValueError(f"max_pending and stream_events must be at least 1, got {max_pending}, {stream_events}")
        if heartbeat_timeout <= 0 or claim_interval_s < 0:
            raise ValueError(
                f"need heartbeat_timeout > 0 and claim_interval_s >= 0: {heartbeat_timeout}, {claim_interval_s}"
            )
        self.max_pending = max_pending
        self.stream_events = stream_events
        self.heartbeat_timeout = heartbeat_timeout
        self.timeout_s = timeout_s
        self.where = redact(url)
        self.keys = Keys(prefix)
        self.ttl_ms = math.ceil(response_ttl_s * 1000)
        self.health = Health(self.where)
        # no blanket retry: a command retried after Redis ran it but the reply was lost could act twice; submit,
        # publish and cancel are idempotent and go through `_sent_again` instead, which sends once more on a new
        # connection when a restarted Redis had closed the one they got from the pool (redis-py does not always
        # notice before handing it out)
        timeouts = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
        self.client = client(url, password, decode_responses=True, retry=Retry(NoBackoff(), 0), **timeouts)
        blocking = functools.partial(blocking_client, url, password, timeout_s)
        self.blocking = blocking()  # response readers: each holds a connection while it blocks
        self._submit = self.client.register_script(redis_scripts.SUBMIT)
        self._publish = self.client.register_script(redis_scripts.PUBLISH)
        claimer = Claimer(self.client, self.keys, heartbeat_timeout, claim_interval_s)
        self._work = WorkReader(self.client, blocking, self.keys, self.health, timeout_s, claimer)
        self.reading: set[str] = set()  # request ids whose stream is open here
        self._sent: dict[str, ReplicaStatus] = {}  # heartbeats sent from this process
        self._status: dict[str, ReplicaStatus] = {}
        self._bad_status: dict[str, str] = {}  # malformed replica fields already logged
        self._gaps: set[str] = set()  # responses an outage may have cut an event from, their Finished not yet sent
        self._owed: dict[str, Finished] = {}  # Finished events an outage kept from Redis: a heartbeat sends them
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False

    def unavailable(self, exc: BaseException) -> NotReady:
        log.warning("bus: redis at %s is unavailable: %s", self.where, exc or type(exc).__name__)
        return NotReady("the event bus is unavailable; retry shortly")  # a client is not told the Redis host

    def lost(self, finished: Finished, what: str) -> Finished:
        """`finished` turned into the error that ends a response the bus lost part or all of (names no Redis)."""
        message = f"the event bus {what}; retry it"
        return dataclasses.replace(
            finished, status=FinishStatus.ERROR, error_code="model_not_ready", error_message=message
        )

    async def start(self) -> None:
        """Start following other processes' heartbeats. Never raises: an unreachable Redis is logged and retried."""
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(), name="blink-bus-replicas")

    async def close(self) -> None:
        """Stop the background tasks and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self._work.close()
        await self.blocking.aclose()
        await self.client.aclose()

    # gateway side ---------------------------------------------------------------------------------------
    async def submit(self, request: GenerateRequest, replica_id: str | None = None) -> RedisResponseStream:
        rid = request.request_id
        if rid in self.reading:
            raise ValueError(f"request id {rid!r} is already in flight")
        pool = self.keys.pool(request.model)
        target = pool if replica_id is None else self.keys.direct(request.model, replica_id)
        keys = [pool, self.keys.resp(rid), self.keys.state(rid), target]
        args: list[EncodableT] = [GROUP, self.max_pending, encode(request), self.ttl_ms]
        try:
            entry = await self._sent_again(lambda: self._submit(keys=keys, args=args))
        except ERRORS as exc:
            raise self.unavailable(exc) from exc
        if entry is None:
            raise Overloaded(f"{self.max_pending} requests are already waiting for {request.model!r}")
        self.reading.add(rid)
        return RedisResponseStream(self, rid)

    async def cancel(self, request_id: str, model: str) -> None:
        cancel: dict[FieldT, EncodableT] = {FIELD: encode(Cancel(request_id, model))}
        try:  # a cancel landing twice is harmless
            await self._sent_again(
                lambda: self.client.xadd(self.keys.cancels(model), cancel, maxlen=CANCEL_KEEP, approximate=True)
            )
        except ERRORS as exc:
            raise self.unavailable(exc) from exc

    def replicas(self) -> list[ReplicaStatus]:
        now = time.time()
        return [s for s in self._status.values() if now - s.sent < self.heartbeat_timeout]

    async def _refresh(self) -> None:
        # not `while True`: redis-py now and then swallows the cancel close() sends (seen with HGETALL), and the
        # loop must end anyway
        while not self._closed:
            try:
                raw = cast(dict[str, str], await self.client.hgetall(self.keys.replicas))
            except ERRORS as exc:
                await asyncio.sleep(max(REFRESH_S, self.health.failed(exc, "reading the replica list")))
                continue
            self.health.ok()
            fresh: dict[str, ReplicaStatus] = {}
            for replica_id, text in raw.items():
                try:
                    fresh[replica_id] = cast(ReplicaStatus, parse({FIELD: text}, (ReplicaStatus,)))
                except ValueError as exc:
                    if self._bad_status.get(replica_id) != text:  # once, not on every refresh
                        self._bad_status[replica_id] = text
                        log.warning("bus: ignoring the malformed status of replica %r: %s", replica_id, exc)
            for replica_id, mine in self._sent.items():  # the read may predate a heartbeat sent meanwhile
                if replica_id not in fresh or mine.sent >= fresh[replica_id].sent:
                    fresh[replica_id] = mine
            # a restarted Redis is empty until each replica beats again: one missing from the hash is kept until
            # its last heartbeat is stale (a field also expires, 2 x heartbeat_timeout after it was written)
            for replica_id, known in self._status.items():
                if replica_id not in fresh and time.time() - known.sent < self.heartbeat_timeout:
                    fresh[replica_id] = known
            self._status = fresh
            await asyncio.sleep(REFRESH_S)

    # replica side ---------------------------------------------------------------------------------------
    async def receive(self, model: str, replica_id: str, *, wait: float, max_requests: int) -> list[WorkMessage]:
        """As Bus.receive. While Redis is unreachable: logs it once, waits up to `wait` and returns nothing."""
        return await self._work.receive(model, replica_id, wait, max_requests)

    async def publish(self, event: ResponseEvent) -> bool:
        """As Bus.publish. After a publish of a response failed (Redis unreachable: the event may or may not be
        in Redis), the response gets no other event but its Finished, turned into an error; a Finished that could
        not be sent is kept and sent by a later heartbeat."""
        rid = event.request_id
        if rid in self._gaps:
            if not isinstance(event, Finished):
                return False
            self._gaps.discard(rid)
            event = self.lost(event, "was unreachable while this response streamed, so part of it may be lost")
        try:
            delivered = await self._append(event)
        except ERRORS as exc:
            self.health.failed(exc, "publishing")
            if isinstance(event, Finished):
                self._owed[rid] = event
            else:
                self._gaps.add(rid)
            return False
        self.health.ok()
        if isinstance(event, Finished):
            self._owed.pop(rid, None)
            await self._work.finished(rid)
        return delivered

    async def _append(self, event: ResponseEvent) -> bool:
        """Append to the response if it is open; True if appended. Raises what redis-py raises."""
        rid = event.request_id
        keys = [self.keys.resp(rid), self.keys.state(rid)]
        finished = int(isinstance(event, Finished))
        args: list[EncodableT] = ["event", self.stream_events, self.ttl_ms, encode(event), finished, uuid.uuid4().hex]
        outcome = int(await self._sent_again(lambda: self._publish(keys=keys, args=args)))
        if outcome < 0:  # the reader fell behind: it gets this error after what it has, and we stop
            over: list[EncodableT] = [
                "overflow",
                self.stream_events,
                self.ttl_ms,
                encode(slow_consumer(rid)),
                1,
                uuid.uuid4().hex,
            ]
            await self._sent_again(lambda: self._publish(keys=keys, args=over))
        return outcome == 1

    async def _sent_again(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent command; if its connection was dead (a restarted Redis closed it while it sat in the
        pool), close the pool's other idle connections, likely dead too, and send it once more on a new one. A
        timeout is not retried: a Redis that does not answer is an outage (the caller's)."""
        try:
            return await command()
        except redis.exceptions.ConnectionError:
            await self.client.connection_pool.disconnect(inuse_connections=False)
            return await command()

    async def _send_owed(self) -> None:
        """Send the Finished events an outage kept back (Redis answered again); stop at the first failure."""
        for rid, finished in list(self._owed.items()):
            if self._owed.get(rid) is not finished:  # sent meanwhile (a concurrent heartbeat)
                continue
            del self._owed[rid]
            await self.publish(finished)
            if rid in self._owed:
                return

    async def heartbeat(self, status: ReplicaStatus) -> None:
        """As Bus.heartbeat; an unreachable Redis is logged, not raised."""
        self._sent[status.replica_id] = self._status[status.replica_id] = status
        try:
            await self._work.register(status.model, status.replica_id)
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.keys.replicas, status.replica_id, encode(status))
            pipe.hpexpire(self.keys.replicas, math.ceil(2000 * self.heartbeat_timeout), status.replica_id)
            await pipe.execute()
        except ERRORS as exc:
            self.health.failed(exc, "sending a heartbeat")
            return
        self.health.ok()
        if self._owed:
            await self._send_owed()


class RedisResponseStream:
    """One request's events, read with XREAD BLOCK after `last_id`, the id of the last entry read (the resume
    point: ids increase along the stream). What was consumed is deleted with the next read, so until the consumer
    asks for more it still counts against stream_events. Each read also checks that the response's state key
    exists: without it (Redis restarted empty, or the response expired) nothing will come, and the stream ends
    with Finished(ERROR, model_not_ready) after what was read."""

    def __init__(self, bus: RedisBus, request_id: str, after: str = "0-0") -> None:
        self.request_id = request_id
        self.last_id = after
        self.closed = False
        self._bus = bus
        self._key = bus.keys.resp(request_id)

    async def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        bus = self._bus
        consumed: list[str] = []
        outage: float | None = None
        while not self.closed:
            pipe = bus.blocking.pipeline(transaction=False)
            if consumed:
                pipe.xdel(self._key, *consumed)
            pipe.exists(bus.keys.state(self.request_id))  # before the read: no entry can come after it is gone
            pipe.xread({self._key: self.last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
            try:
                async with asyncio.timeout(READ_BLOCK_MS / 1000 + bus.timeout_s):  # no extra task, as wait_for
                    replies = await pipe.execute()
            except ERRORS as exc:
                outage = outage or time.monotonic()
                if time.monotonic() - outage >= bus.heartbeat_timeout:
                    await self._end()
                    message = bus.unavailable(exc).message
                    yield Finished(
                        self.request_id, FinishStatus.ERROR, error_code="model_not_ready", error_message=message
                    )
                    return
                await asyncio.sleep(bus.health.failed(exc, "reading a response"))
                continue
            outage, consumed = None, []
            for entry_id, fields in entries(replies[-1]):
                self.last_id = entry_id
                consumed.append(entry_id)
                try:
                    event = cast(ResponseEvent, parse(fields, (Accepted, TokenEvent, Finished)))
                except ValueError as exc:
                    log.warning("bus: dropping malformed entry %s of %s: %s", entry_id, self._key, exc)
                    continue
                if isinstance(event, Finished):
                    await self._end()
                yield event
                if isinstance(event, Finished):
                    return
            if not replies[-2]:
                await self._end()
                yield bus.lost(Finished(self.request_id, FinishStatus.ERROR), "lost this response (did Redis restart?)")
                return

    async def _end(self) -> None:
        """The response is over: drop its stream now rather than at its expiry."""
        self.closed = True
        self._bus.reading.discard(self.request_id)
        try:
            await self._bus.client.delete(self._key)
        except ERRORS as exc:
            self._bus.health.failed(exc, "deleting a finished response")

    async def close(self) -> None:
        """Stop receiving: mark the response done (publish returns False from then on) and drop what is unread.
        Never raises; if Redis is unreachable the replica stops when the stream overflows or the deadline passes."""
        if self.closed:
            return
        self.closed = True
        self._bus.reading.discard(self.request_id)
        pipe = self._bus.client.pipeline(transaction=False)
        pipe.set(self._bus.keys.state(self.request_id), "closed", px=self._bus.ttl_ms)
        pipe.delete(self._key)
        try:
            await pipe.execute()
        except ERRORS as exc:
            self._bus.health.failed(exc, "closing a response")
