"""Failover (Bus.reclaims): a dead replica's requests are re-delivered to a live replica of its pool. Redis only
(MemoryBus does not reclaim: its replicas die with its process). Each "process" is a bus of its own on one Redis;
a replica dies by no longer heartbeating or receiving, as after kill -9."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from blink.bus.memory import MemoryBus
from blink.bus.messages import Accepted, Finished, FinishStatus, ReplicaState, ReplicaStatus, TokenEvent
from blink.bus.redis import RedisBus
from tests.contract.test_bus import Buses, drain, req, run
from tests.redis_server import RedisServer

TIMEOUT = 0.5  # heartbeat_timeout of every bus here: a replica silent this long is dead
FAST = {"heartbeat_timeout": TIMEOUT, "claim_interval_s": 0.1}


@pytest.fixture
def buses(redis_server: RedisServer, redis_prefix: str) -> Buses:
    return Buses(lambda **kwargs: RedisBus(redis_server.url, prefix=redis_prefix, **{**FAST, **kwargs}))


def beat(replica_id: str, state: ReplicaState = ReplicaState.READY, age: float = 0.0) -> ReplicaStatus:
    return ReplicaStatus(replica_id, "m", state, sent=time.time() - age)


async def serve(
    bus: RedisBus, replica_id: str, until: int, seconds: float, max_requests: int = 8, seen: list[str] | None = None
) -> list[str]:
    """Be a live replica for up to `seconds` (heartbeat, receive) until `until` requests came to it, or to all who
    share `seen`. Returns the ids of those it received."""
    got: list[str] = []
    seen = got if seen is None else seen
    deadline = time.monotonic() + seconds
    while len(seen) < until and time.monotonic() < deadline:
        await bus.heartbeat(beat(replica_id))
        work = await bus.receive("m", replica_id, wait=0.05, max_requests=max_requests)
        assert len(work) <= max_requests  # claimed ones too
        got += [m.request_id for m in work]
        if seen is not got:
            seen += [m.request_id for m in work]
    return got


async def heartbeats(bus: RedisBus, replica_id: str, state: ReplicaState, seconds: float) -> None:
    """A replica busy generating (or stopped with requests left pending): it heartbeats, it does not receive."""
    for _ in range(round(seconds / 0.1)):
        await bus.heartbeat(beat(replica_id, state))
        await asyncio.sleep(0.1)


async def pool_state(redis_server: RedisServer, prefix: str) -> tuple[int, int, list[str]]:
    """(stream length, pending entries, consumer names) of pool m."""
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        pool = f"{prefix}:pool:m"
        consumers = await raw.xinfo_consumers(pool, "replicas")
        pending = (await raw.xpending(pool, "replicas"))["pending"]
        return await raw.xlen(pool), pending, sorted(c["name"] for c in consumers)
    finally:
        await raw.aclose()


def test_only_the_redis_bus_reclaims() -> None:
    assert RedisBus.reclaims and not MemoryBus.reclaims


def test_a_dead_replicas_request_is_taken_over_and_answered_in_the_same_stream(
    buses: Buses, redis_server: RedisServer, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        gateway, p1, p2 = await buses(), await buses(), await buses()
        assert isinstance(p1, RedisBus) and isinstance(p2, RedisBus)
        await p2.heartbeat(beat("r2"))
        await p1.heartbeat(last := beat("r1"))
        stream = await gateway.submit(req("a"))
        assert [m.request_id for m in await p1.receive("m", "r1", wait=5, max_requests=8)] == ["a"]
        before = [Accepted("a", "r1", 3), TokenEvent("a", 0, "he", 1)]
        for event in before:
            assert await p1.publish(event)
        await p1.close()  # r1 dies: no heartbeat, no receive, nothing acknowledged
        with caplog.at_level(logging.INFO, logger="blink.bus"):
            assert await serve(p2, "r2", until=1, seconds=5) == ["a"]
        assert time.time() - last.sent > TIMEOUT  # not before r1 counted as dead
        assert any("r2 took over 1 request(s) of dead replica r1" in r.message for r in caplog.records)
        after = [Accepted("a", "r2", 3), TokenEvent("a", 0, "he", 1), Finished("a", FinishStatus.STOP, 3, 1)]
        for event in after:
            assert await p2.publish(event)
        assert await asyncio.wait_for(drain(stream.__aiter__()), 5) == before + after
        assert await pool_state(redis_server, redis_prefix) == (0, 0, ["r2"])  # r1's consumer is deleted

    run(buses, main)


def test_a_live_replica_is_never_robbed_but_a_stopped_one_is(
    buses: Buses, redis_server: RedisServer, redis_prefix: str
) -> None:
    async def main() -> None:
        gateway, p1, p2 = await buses(), await buses(), await buses()
        assert isinstance(p1, RedisBus) and isinstance(p2, RedisBus)
        await p1.heartbeat(beat("r1"))
        await gateway.submit(req("a"))
        assert [m.request_id for m in await p1.receive("m", "r1", wait=5, max_requests=8)] == ["a"]
        robbed, _ = await asyncio.gather(
            serve(p2, "r2", until=1, seconds=3 * TIMEOUT), heartbeats(p1, "r1", ReplicaState.READY, 3 * TIMEOUT)
        )
        assert robbed == []
        assert (await pool_state(redis_server, redis_prefix))[1:] == (1, ["r1", "r2"])
        stopped = asyncio.create_task(heartbeats(p1, "r1", ReplicaState.STOPPED, 5))  # "a" left pending
        try:
            assert await serve(p2, "r2", until=1, seconds=3) == ["a"]  # fresh heartbeats, yet dead
        finally:
            stopped.cancel()
            await asyncio.gather(stopped, return_exceptions=True)

    run(buses, main)


def test_a_claimed_request_nobody_waits_for_is_dropped_not_delivered(
    buses: Buses, redis_server: RedisServer, redis_prefix: str
) -> None:
    async def main() -> None:
        gateway, p1, p2 = await buses(), await buses(), await buses()
        assert isinstance(p1, RedisBus) and isinstance(p2, RedisBus)
        await p1.heartbeat(beat("r1"))
        streams = {rid: await gateway.submit(req(rid)) for rid in "abcd"}
        assert len(await p1.receive("m", "r1", wait=5, max_requests=8)) == 4
        await streams["a"].close()  # the client went away
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:  # b: finished, but its acknowledgement was lost; c: expired
            await raw.set(f"{redis_prefix}:state:b", "finished")
            await raw.delete(f"{redis_prefix}:state:c")
        finally:
            await raw.aclose()
        await p1.heartbeat(beat("r1", age=10 * TIMEOUT))  # its last heartbeat is long past: dead
        assert await serve(p2, "r2", until=1, seconds=3) == ["d"]  # claimed with the others, which were dropped
        assert await pool_state(redis_server, redis_prefix) == (1, 1, ["r2"])

    run(buses, main)


def test_two_replicas_racing_for_a_dead_ones_requests_deliver_each_once(
    buses: Buses, redis_server: RedisServer, redis_prefix: str
) -> None:
    async def main() -> None:
        gateway, p1, p2, p3 = await buses(), await buses(), await buses(), await buses()
        assert isinstance(p1, RedisBus) and isinstance(p2, RedisBus) and isinstance(p3, RedisBus)
        await p1.heartbeat(beat("r1"))
        rids = [f"q{i}" for i in range(12)]
        for rid in rids:
            await gateway.submit(req(rid))
        assert len(await p1.receive("m", "r1", wait=5, max_requests=len(rids))) == len(rids)
        await p1.heartbeat(beat("r1", age=10 * TIMEOUT))
        seen: list[str] = []
        got2, got3 = await asyncio.gather(  # at most 2 per receive: the rest stays with r1 until claimed
            serve(p2, "r2", until=len(rids), seconds=3, max_requests=2, seen=seen),
            serve(p3, "r3", until=len(rids), seconds=3, max_requests=2, seen=seen),
        )
        assert sorted(got2 + got3) == sorted(rids) and got2 and got3
        assert await pool_state(redis_server, redis_prefix) == (len(rids), len(rids), ["r2", "r3"])

    run(buses, main)


def test_requests_routed_to_a_replica_that_died_are_claimed_by_another(
    buses: Buses, redis_server: RedisServer, redis_prefix: str
) -> None:
    """What a dead replica held from its direct stream, and what it never read there, both go to a live replica;
    its direct stream is deleted once empty, and later submits for it go to the pool."""

    async def main() -> None:
        gateway, dead, live = await buses(), await buses(), await buses()
        assert isinstance(dead, RedisBus) and isinstance(live, RedisBus)
        await dead.heartbeat(beat("dead"))
        await live.heartbeat(beat("live"))
        await dead.receive("m", "dead", wait=0, max_requests=8)
        streams = [await gateway.submit(req(rid), "dead") for rid in ("held", "unread")]
        assert [m.request_id for m in await dead.receive("m", "dead", wait=1, max_requests=1)] == ["held"]
        await dead.close()  # killed: no more heartbeats
        got = await serve(live, "live", until=2, seconds=10)
        assert sorted(got) == ["held", "unread"]
        for rid in got:
            assert await live.publish(Finished(rid, FinishStatus.STOP))
        for stream in streams:
            assert [type(e) for e in await asyncio.wait_for(drain(stream.__aiter__()), 5)] == [Finished]
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            deadline = time.monotonic() + 5  # the next claim pass finds it empty and deletes it
            while await raw.exists(f"{redis_prefix}:direct:m:dead"):
                assert time.monotonic() < deadline
                await serve(live, "live", until=1, seconds=0.2)
        finally:
            await raw.aclose()
        await gateway.submit(req("later"), "dead")
        assert await serve(live, "live", until=1, seconds=5) == ["later"]

    run(buses, main)


def test_a_routed_request_survives_a_chain_of_failovers(buses: Buses) -> None:
    """Sent to A, which dies; B takes it over and dies in turn; C still finds it (what B took from A's direct
    stream moved to B's own, so C's claim of B finds it)."""

    async def main() -> None:
        gateway, a, b, c = await buses(), await buses(), await buses(), await buses()
        await a.heartbeat(beat("a"))
        await a.receive("m", "a", wait=0, max_requests=8)
        stream = await gateway.submit(req("x"), "a")
        assert [m.request_id for m in await a.receive("m", "a", wait=1, max_requests=8)] == ["x"]
        await a.close()
        assert await serve(b, "b", until=1, seconds=10) == ["x"]
        await b.close()
        assert await serve(c, "c", until=1, seconds=10) == ["x"]
        assert await c.publish(Finished("x", FinishStatus.STOP))
        assert [type(e) for e in await asyncio.wait_for(drain(stream.__aiter__()), 5)] == [Finished]

    run(buses, main)
