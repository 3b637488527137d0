"""A replica's side of the Redis bus: its pool's requests (consumer group), the requests routed to it alone (its
direct stream, same group, read first), and cancels (broadcast stream).

Each replica blocks in XREADGROUP on a connection of its own while a watcher task blocks in XREAD on the pool's
cancel stream on another; a cancel ends the first block with CLIENT UNBLOCK rather than waiting it out. An idle
receive costs one round trip before it blocks; a busy one (wait 0) one round trip in all. At most every
claim_interval_s a receive first looks for dead replicas of its pool and takes their requests over (redis_claim.py):
two or three round trips more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from blink.bus.messages import Cancel, GenerateRequest, WorkMessage
from blink.bus.redis_claim import Claimer
from blink.bus.redis_wire import ERRORS, GROUP, Entries, Health, Keys, by_stream, entries, parse

log = logging.getLogger("blink.bus")

CANCEL_BLOCK_MS = 5000  # a cancel watcher's block; the next receive starts a new one
UNBLOCK_TRIES, UNBLOCK_RETRY_S = 20, 0.005


@dataclass
class _Consumer:
    """One replica's reading state in this process."""

    replica_id: str
    model: str
    pool: str
    direct: str  # requests routed to this replica (it holds their prefix): read with the pool, before it
    cancels: str
    cursor: str  # last cancel entry seen: a replica gets the cancels sent after it first showed up
    pool_conn: aioredis.Redis  # XREADGROUP only, so that CLIENT UNBLOCK ends exactly that block
    cancel_conn: aioredis.Redis  # the watcher's XREAD BLOCK
    pool_id: int | None = None  # CLIENT ID of pool_conn; None once its connection dropped
    next_claim: float = 0.0  # monotonic time of the next look for dead replicas' requests
    recover: bool = False  # a pool read failed after it was sent: Redis may have delivered entries we never saw
    # read from Redis but not handed out yet: a receive cancelled after Redis answered must not lose them
    inbox: list[Cancel] = field(default_factory=list)
    ready: list[GenerateRequest] = field(default_factory=list)
    watcher: asyncio.Task[list[Cancel]] | None = None


Connect = Callable[[], aioredis.Redis]  # a new client (for blocking reads: redis_wire.blocking_client)


class WorkReader:
    """Receives work for the replicas of one process and acknowledges each request once it is finished."""

    def __init__(
        self, client: aioredis.Redis, blocking: Connect, keys: Keys, health: Health, timeout_s: float, claimer: Claimer
    ) -> None:
        self._client, self._blocking, self._keys = client, blocking, keys
        self._health, self._timeout_s, self._claimer = health, timeout_s, claimer
        self._consumers: dict[str, _Consumer] = {}
        self._taken: dict[str, tuple[str, str]] = {}  # request id -> (stream, entry id) until its Finished
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        watchers = [c.watcher for c in self._consumers.values() if c.watcher is not None]
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for c in self._consumers.values():
            await c.pool_conn.aclose()
            await c.cancel_conn.aclose()

    async def receive(self, model: str, replica_id: str, wait: float, max_requests: int) -> list[WorkMessage]:
        """As Bus.receive. While Redis is unreachable: logs it once, waits up to `wait` and returns what was read
        before (usually nothing)."""
        if self.closed:
            return []
        deadline = time.monotonic() + max(0.0, wait)
        if self._health.retry_at <= time.monotonic():
            try:
                out = await self._receive(model, replica_id, wait, max_requests)
            except ERRORS as exc:
                if self.closed:  # its connections were closed under it
                    return []
                self._health.failed(exc, "receiving work")
            else:
                self._health.ok()
                return out
        c = self._consumers.get(replica_id)
        if c is None or not (c.inbox or (c.ready and max_requests)):
            await asyncio.sleep(max(0.0, min(deadline, self._health.retry_at) - time.monotonic()))
        return self._hand_out(c, max_requests) if c is not None else []

    async def _receive(self, model: str, replica_id: str, wait: float, n: int) -> list[WorkMessage]:
        c = await self.register(model, replica_id)
        self._watch(c)
        if time.monotonic() >= c.next_claim:
            c.next_claim = time.monotonic() + self._claimer.interval_s
            await self._claim(c, max(0, n - len(c.ready)))
        if len(c.ready) < n:
            await self._read_pool(c, n - len(c.ready), None)
        if not c.inbox and not (n and c.ready) and wait > 0:
            await self._wait(c, n, wait)
        return self._hand_out(c, n)

    def _hand_out(self, c: _Consumer, n: int) -> list[WorkMessage]:
        """Synchronous, so what leaves c.inbox and c.ready reaches the caller: each is handed out exactly once."""
        if c.watcher is not None and c.watcher.done():
            self._watch(c)
        out: list[WorkMessage] = [*c.inbox, *c.ready[:n]]
        c.inbox.clear()
        del c.ready[:n]
        return out

    async def register(self, model: str, replica_id: str) -> _Consumer:
        """Remember the replica (first call: its pool, and the cancel stream's current end as its cursor)."""
        if replica_id in self._consumers:
            return self._consumers[replica_id]
        pool, cancels = self._keys.pool(model), self._keys.cancels(model)
        direct = self._keys.direct(model, replica_id)
        last = cast(list[tuple[str, Any]], await self._client.xrevrange(cancels, count=1))
        await self._ensure_group(pool)
        await self._ensure_group(direct)
        cursor = last[0][0] if last else "0-0"
        conns = self._blocking(), self._blocking()
        consumer = _Consumer(replica_id, model, pool, direct, cancels, cursor, *conns)
        return self._consumers.setdefault(replica_id, consumer)  # a concurrent first call may have won

    async def _ensure_group(self, pool: str) -> None:
        try:  # id 0: requests submitted before any replica came are delivered
            await self._client.xgroup_create(pool, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _watch(self, c: _Consumer) -> asyncio.Task[list[Cancel]]:
        """Collect what a finished watcher read into the inbox; make sure one is watching. Returns it."""
        if c.watcher is not None and c.watcher.done():
            if not c.watcher.cancelled():
                c.inbox.extend(c.watcher.result())
            c.watcher = None
        if c.watcher is None:
            c.watcher = asyncio.get_running_loop().create_task(self._watch_cancels(c), name="blink-bus-cancels")
        return c.watcher

    async def _watch_cancels(self, c: _Consumer) -> list[Cancel]:
        """Block until cancels come (or CANCEL_BLOCK_MS pass); never raises but CancelledError."""
        try:
            async with asyncio.timeout(CANCEL_BLOCK_MS / 1000 + self._timeout_s):
                reply = await c.cancel_conn.xread({c.cancels: c.cursor}, block=CANCEL_BLOCK_MS)
        except ERRORS as exc:
            await asyncio.sleep(self._health.failed(exc, "watching cancels"))  # the cursor keeps what comes
            return []
        out = []
        for entry_id, fields in entries(reply):
            c.cursor = entry_id
            try:
                out.append(cast(Cancel, parse(fields, (Cancel,))))
            except ValueError as exc:
                log.warning("bus: dropping malformed entry %s of %s: %s", entry_id, c.cancels, exc)
        return out

    async def _wait(self, c: _Consumer, n: int, wait: float) -> None:
        """Block up to `wait` s for requests (when n > 0) or cancels; a cancel ends the block at once."""
        loop = asyncio.get_running_loop()
        if n == 0:
            deadline = loop.time() + wait
            while not c.inbox and (left := deadline - loop.time()) > 0:
                await asyncio.wait({self._watch(c)}, timeout=left)
                self._watch(c)
            return
        if c.pool_id is None:
            async with asyncio.timeout(self._timeout_s):
                c.pool_id = int(await c.pool_conn.client_id())
        read = loop.create_task(self._read_pool(c, n, max(1, round(wait * 1000))))  # BLOCK 0 blocks forever
        try:
            while not read.done():
                watcher = self._watch(c)
                if c.inbox:
                    await self._unblock(c, read)
                    break
                await asyncio.wait({read, watcher}, return_when=asyncio.FIRST_COMPLETED)
            await read
        finally:
            read.cancel()  # only matters when receive itself was cancelled

    async def _unblock(self, c: _Consumer, read: asyncio.Task[None]) -> None:
        """End the pool read's block early. Tried again for a moment: Redis may not have started that block yet
        (the unblock goes on another connection); if it never succeeds the block runs out within its wait."""
        assert c.pool_id is not None
        for _ in range(UNBLOCK_TRIES):
            try:
                if await self._client.client_unblock(c.pool_id):
                    return
            except ERRORS as exc:
                log.debug("bus: CLIENT UNBLOCK failed: %s", exc)
                return
            await asyncio.wait({read}, timeout=UNBLOCK_RETRY_S)
            if read.done():
                return

    async def _read_pool(self, c: _Consumer, n: int, block_ms: int | None) -> None:
        """Up to n requests into c.ready (of each stream: its direct one and the pool; what is over n waits in
        c.ready): first any that a failed read left pending here, else new ones."""
        try:
            if c.recover and await self._recover(c, n):
                return
            async with asyncio.timeout((block_ms or 0) / 1000 + self._timeout_s):  # pool_conn has no socket timeout
                streams: dict[KeyT, StreamIdT] = {c.direct: ">", c.pool: ">"}
                reply = await c.pool_conn.xreadgroup(GROUP, c.replica_id, streams, count=n, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # a stream is gone (Redis restarted empty): make it again, read next time
                await self._ensure_group(c.pool)
                await self._ensure_group(c.direct)
                return
            raise
        except BaseException:
            c.pool_id, c.recover = None, True
            raise
        for stream, found in by_stream(reply):
            await self._take(c, stream, found)

    async def _recover(self, c: _Consumer, n: int) -> int:
        """Entries delivered to this consumer that it never handed out: its pending list minus what it holds."""
        async with asyncio.timeout(self._timeout_s):
            reply = await c.pool_conn.xreadgroup(GROUP, c.replica_id, {c.direct: "0", c.pool: "0"})
        held = set(self._taken.values())
        lost = [(stream, [e for e in found if (stream, e[0]) not in held]) for stream, found in by_stream(reply)]
        total = sum(len(found) for _, found in lost)
        c.recover = total > n
        # not checked for being open (one round trip fewer): a replica's Accepted for one that is not is refused
        for stream, found in lost:
            n -= await self._take(c, stream, found[: max(0, n)])
        return total

    async def _claim(self, c: _Consumer, room: int) -> None:
        """Take over up to `room` requests of dead replicas of c's pool (into c.ready, like new ones)."""
        try:
            claimed = await self._claimer.claim(c.model, c.replica_id, room)
            for dead, streams in claimed.items():
                taken = found = 0
                for stream, entries_ in streams:
                    taken += await self._take(c, stream, entries_, only_open=True)
                    found += len(entries_)
                log.info(
                    "bus: replica %s took over %d request(s) of dead replica %s (%d more were no longer wanted)",
                    c.replica_id,
                    taken,
                    dead,
                    found - taken,
                )
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):  # Redis restarted empty: the read makes it again
                return
            c.recover = True
            raise
        except BaseException:  # claimed entries not yet taken are pending here: the recovery read finds them
            c.recover = True
            raise

    async def _take(self, c: _Consumer, stream: str, found: Entries, *, only_open: bool = False) -> int:
        """Parse entries pending for c into c.ready; returns how many. Malformed ones are acknowledged, and with
        `only_open` (claimed ones) those whose response is no longer open (finished, closed, overflowed, expired)."""
        bad, good = [], []
        for entry_id, fields in found:
            try:
                good.append((entry_id, cast(GenerateRequest, parse(fields, (GenerateRequest,)))))
            except ValueError as exc:
                log.warning("bus: dropping malformed entry %s of %s: %s", entry_id, stream, exc)
                bad.append(entry_id)
        if only_open and good:
            states = await self._client.mget([self._keys.state(request.request_id) for _, request in good])
            bad += [entry_id for (entry_id, _), state in zip(good, states, strict=True) if state != "open"]
            good = [taken for taken, state in zip(good, states, strict=True) if state == "open"]
        for entry_id, request in good:
            self._taken[request.request_id] = (stream, entry_id)
            c.ready.append(request)
        if bad:  # acknowledged, or it would stay pending on this replica forever
            try:
                await self._ack(stream, *bad)
            except ERRORS as exc:
                log.warning("bus: could not acknowledge dropped entries of %s: %s", stream, exc)
                c.recover = True  # the recovery read finds them again
        return len(good)

    async def finished(self, request_id: str) -> None:
        """The request's Finished was published: acknowledge it (and delete it) in its pool. Never raises."""
        taken = self._taken.pop(request_id, None)
        if taken is None:
            return
        try:
            await self._ack(*taken)
        except ERRORS as exc:  # left pending: a failover would claim it, find its response no longer open, drop it
            self._health.failed(exc, "acknowledging a request")

    async def _ack(self, stream: str, *entry_ids: str) -> None:
        pipe = self._client.pipeline(transaction=True)  # together, so that XLEN - pending stays the backlog
        pipe.xack(stream, GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        await pipe.execute()
