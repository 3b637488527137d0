"""The bus contract (blink.bus.base), run against every transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from blink.bus.base import Bus
from blink.bus.memory import MemoryBus
from blink.bus.messages import (
    Accepted,
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    Sampling,
    TokenEvent,
)
from blink.errors import Overloaded

TRANSPORTS: dict[str, Callable[..., Bus]] = {"memory": MemoryBus}


@pytest.fixture(params=sorted(TRANSPORTS))
def make_bus(request: pytest.FixtureRequest) -> Callable[..., Bus]:
    return TRANSPORTS[request.param]


def req(rid: str, model: str = "m") -> GenerateRequest:
    return GenerateRequest(rid, model, Sampling(max_tokens=4), prompt="hi")


async def drain(stream: AsyncIterator[object]) -> list[object]:
    return [e async for e in stream]


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_request_reaches_one_replica_and_events_come_back_in_order(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus()
        await bus.start()
        await bus.receive("m", "r1", wait=0, max_requests=8)
        await bus.receive("m", "r2", wait=0, max_requests=8)
        stream = await bus.submit(req("a"))
        got1 = await bus.receive("m", "r1", wait=1, max_requests=8)
        got2 = await bus.receive("m", "r2", wait=0, max_requests=8)
        assert [m.request_id for m in got1 + got2] == ["a"]
        events = [Accepted("a", "r1", 3), TokenEvent("a", 0, "he", 1), TokenEvent("a", 1, "llo", 2)]
        for e in [*events, Finished("a", FinishStatus.STOP, 3, 2)]:
            assert await bus.publish(e)
        received = await asyncio.wait_for(drain(stream.__aiter__()), 5)
        assert received[:3] == events and isinstance(received[3], Finished)
        await bus.close()

    run(main())


def test_requests_for_other_models_are_not_delivered(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus()
        await bus.submit(req("x", model="other"))
        assert await bus.receive("m", "r1", wait=0.05, max_requests=8) == []
        assert [m.request_id for m in await bus.receive("other", "r9", wait=1, max_requests=8)] == ["x"]

    run(main())


def test_cancel_reaches_the_replicas_of_the_pool(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus()
        await bus.receive("m", "r1", wait=0, max_requests=8)
        await bus.submit(req("a"))
        await bus.receive("m", "r1", wait=1, max_requests=8)
        waiter = asyncio.create_task(bus.receive("m", "r1", wait=5, max_requests=8))
        await asyncio.sleep(0)
        await bus.cancel("a", "m")
        got = await asyncio.wait_for(waiter, 5)
        assert got == [Cancel("a", "m")]

    run(main())


def test_full_pool_queue_is_overloaded(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus(max_pending=2)
        await bus.submit(req("a"))
        await bus.submit(req("b"))
        with pytest.raises(Overloaded):
            await bus.submit(req("c"))

    run(main())


def test_a_replica_takes_at_most_what_it_asks_for_and_the_rest_stays_queued(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus(max_pending=3)
        await bus.receive("m", "r1", wait=0, max_requests=0)
        for rid in "abc":
            await bus.submit(req(rid))
        assert [m.request_id for m in await bus.receive("m", "r1", wait=0, max_requests=2)] == ["a", "b"]
        with pytest.raises(Overloaded):  # the one left still counts against the bound, with two new ones
            for rid in "def":
                await bus.submit(req(rid))
        assert await bus.receive("m", "r1", wait=0, max_requests=0) == []
        await bus.cancel("a", "m")
        got = await bus.receive("m", "r1", wait=1, max_requests=0)  # cancels come whatever the room
        assert [type(m).__name__ for m in got] == ["Cancel"]
        assert [m.request_id for m in await bus.receive("m", "r1", wait=0, max_requests=9)] == ["c", "d", "e"]

    run(main())


def test_slow_consumer_gets_bounded_buffer_then_an_error(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus(stream_events=4)
        stream = await bus.submit(req("a"))
        results = [await bus.publish(TokenEvent("a", i, "t", i + 1)) for i in range(10)]
        assert results == [True] * 4 + [False] * 6  # never blocks, stops accepting
        received = await asyncio.wait_for(drain(stream.__aiter__()), 5)
        assert len(received) == 5
        last = received[-1]
        assert isinstance(last, Finished) and last.error_code == "slow_consumer"

    run(main())


def test_publish_after_the_consumer_closed_returns_false(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus()
        stream = await bus.submit(req("a"))
        await stream.close()
        assert not await bus.publish(TokenEvent("a", 0, "t", 1))

    run(main())


def test_heartbeats_list_replicas(make_bus: Callable[..., Bus]) -> None:
    async def main() -> None:
        bus = make_bus()
        await bus.heartbeat(ReplicaStatus("r1", "m", ReplicaState.WARMING))
        await bus.heartbeat(ReplicaStatus("r1", "m", ReplicaState.READY, running=2))
        (status,) = bus.replicas()
        assert status.state is ReplicaState.READY and status.running == 2

    run(main())
