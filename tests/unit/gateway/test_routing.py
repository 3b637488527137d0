"""Routing by prefix affinity: a conversation's requests go to the replica that holds its prefix, unless that
replica is much busier than the least-loaded one (then the pool, which any replica with room reads)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from blink.bus.messages import GenerateRequest, Sampling
from blink.gateway.service import AFFINITY_SLACK_S, affinity_key
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer

Serve = Callable[..., LiveServer]


def wait_for_replicas(server: LiveServer, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(httpx.get(f"{server.base}/readyz").json()["replicas"]) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_each_conversations_turns_stay_on_the_replica_that_took_its_first(serve: Serve) -> None:
    """Two conversations in step: their first turns go one to each replica; without affinity every later pair
    would land on whichever replica reads the pool first (it takes up to 8 requests at once)."""
    a = FakeReplica(MODEL, replica_id="a", reply=("x",) * 10, delay=0.01)
    b = FakeReplica(MODEL, replica_id="b", reply=("x",) * 10, delay=0.01)
    server = serve(a, b)
    wait_for_replicas(server, 2)

    async def conversation(client: httpx.AsyncClient, name: str) -> None:
        history = [{"role": "system", "content": f"You are {name}."}, {"role": "user", "content": "Hi!"}]
        for turn in range(4):
            reply = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": history})
            history += [reply.json()["choices"][0]["message"], {"role": "user", "content": f"And {turn}?"}]

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base, timeout=10) as client:
            await asyncio.gather(conversation(client, "Ann"), conversation(client, "Bob"))

    asyncio.run(main())
    owners = {
        name: {r.replica_id for r in (a, b) for q in r.requests if f"You are {name}." in str(q.messages)}
        for name in ("Ann", "Bob")
    }
    assert len(owners["Ann"]) == 1 and len(owners["Bob"]) == 1, owners
    assert len(a.requests) + len(b.requests) == 8


def test_a_replica_whose_heartbeat_holds_the_prefix_gets_it_unless_much_busier(serve: Serve) -> None:
    # as the gateway names it: the request of the open server's one tenant
    request = GenerateRequest(
        "r1", MODEL, Sampling(), messages=({"role": "user", "content": "hello"},), tenant="default"
    )
    key = affinity_key(request)
    holder = FakeReplica(MODEL, replica_id="holder", prefixes=(key,))
    other = FakeReplica(MODEL, replica_id="other")
    server = serve(holder, other)
    wait_for_replicas(server, 2)
    routed = GenerateRequest("r2", MODEL, Sampling(), messages=request.messages, affinity=key)
    assert server.gateway.route(routed) == "holder"
    for _ in range(3):  # over HTTP too
        httpx.post(f"{server.base}/v1/chat/completions", json={"model": MODEL, "messages": list(request.messages)})
    assert len(holder.requests) == 3 and not other.requests
    holder.queue_wait_s = AFFINITY_SLACK_S + 0.5  # busier than the idle one by more than the slack
    deadline = time.monotonic() + 5
    while server.gateway.route(routed) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    unknown = GenerateRequest("r3", MODEL, Sampling(), messages=({"role": "user", "content": "new"},))
    assert server.gateway.route(GenerateRequest("r3", MODEL, Sampling(), affinity=affinity_key(unknown))) is None
