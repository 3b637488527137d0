"""The edge's link to a core (edge/link.py, gateway/link.py): a live core gateway with scripted replicas, the link
client in the test's own event loop, and the netem proxy between them where a test cuts the link."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from blink.bench.netem import Proxy
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, ResponseEvent, Sampling, TokenEvent
from blink.edge.link import Link, LinkStream
from blink.errors import CoreUnreachable
from blink.gateway.keys import KeyFile
from tests.redis_server import free_port
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer, make_keys

Serve = Callable[..., LiveServer]


def request(rid: str, tenant: str = "default") -> GenerateRequest:
    return GenerateRequest(rid, MODEL, Sampling(max_tokens=64), prompt="Hi", tenant=tenant)


async def events(stream: LinkStream, timeout: float = 20) -> list[ResponseEvent]:
    async def take() -> list[ResponseEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(take(), timeout)


async def linked(base: str, key: str = "", **kw: float) -> Link:
    link = Link(base, key, **kw)
    await link.start()
    assert await link.wait_connected(10), "the link did not connect"
    return link


def test_a_link_carries_requests_with_their_tenant_and_learns_the_cores_models(serve: Serve) -> None:
    replica = FakeReplica(MODEL, reply=("one", " two", " three"))
    core = serve(replica)

    async def main() -> list[ResponseEvent]:
        link = await linked(core.base)
        try:
            assert link.models == [MODEL] and [r.replica_id for r in link.replicas()] == [replica.replica_id]
            streams = [await link.submit(request(f"r{i}", tenant=f"t{i}")) for i in range(3)]  # multiplexed
            got = [await events(s) for s in streams]
            assert [[type(e) for e in g] for g in got[:2]] == [[type(e) for e in got[2]]] * 2
            return got[2]
        finally:
            await link.close()

    got = asyncio.run(main())
    assert isinstance(got[0], Accepted) and got[0].replica_id == replica.replica_id
    assert [e.text for e in got if isinstance(e, TokenEvent)] == ["one", " two", " three"]
    assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.STOP
    assert sorted(r.tenant or "" for r in replica.requests) == ["t0", "t1", "t2"]  # kept apart by name on the core


def test_only_an_admin_key_opens_a_link_to_a_keyed_core(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = make_keys(path, "acme")
    _, admin = KeyFile(path).add("ops", admin=True)
    core = serve(FakeReplica(MODEL), api_keys=str(path))

    async def main() -> Finished:
        refused = Link(core.base, keys["acme"])
        await refused.start()
        try:
            assert not await refused.wait_connected(1.5)
            with pytest.raises(CoreUnreachable):
                await refused.submit(request("x", tenant="acme"))
        finally:
            await refused.close()
        link = await linked(core.base, admin)
        try:
            ok = await events(await link.submit(request("a", tenant="acme")))
            assert isinstance(ok[-1], Finished) and ok[-1].status is FinishStatus.STOP
            stranger = await events(await link.submit(request("b", tenant="nobody")))
            assert isinstance(stranger[-1], Finished)
            return stranger[-1]
        finally:
            await link.close()

    finished = asyncio.run(main())
    assert finished.status is FinishStatus.ERROR and finished.error_code == "permission_denied"


def test_a_cancel_over_the_link_frees_the_cores_sequence(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    core = serve(replica)

    async def main() -> list[ResponseEvent]:
        link = await linked(core.base)
        try:
            stream = await link.submit(request("held"))
            pending = asyncio.ensure_future(events(stream))
            while not replica.held:
                await asyncio.sleep(0.01)
            await link.cancel("held")
            return await pending
        finally:
            await link.close()

    got = asyncio.run(main())
    assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.CANCELLED
    assert replica.held == []


def test_a_cancel_while_the_link_is_down_ends_the_response_and_reaches_the_core_on_reconnect(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    core = serve(replica, resume_window_s=20)

    async def main() -> list[ResponseEvent]:
        proxy = Proxy("127.0.0.1", int(core.base.rsplit(":", 1)[1]))
        await proxy.start()
        link = await linked(f"http://127.0.0.1:{proxy.port}", ping_interval_s=0.2, ping_timeout_s=0.6)
        try:
            stream = await link.submit(request("held"))
            pending = asyncio.ensure_future(events(stream))
            while not replica.held:
                await asyncio.sleep(0.01)
            proxy.cut("blackhole")
            while link.connected:
                await asyncio.sleep(0.05)
            await link.cancel("held")
            got = await pending  # at once: the client is not kept waiting for the link
            proxy.restore()
            deadline = asyncio.get_running_loop().time() + 20
            while replica.held:  # the cancel went over the new connection
                assert asyncio.get_running_loop().time() < deadline, "the cancel never reached the core"
                await asyncio.sleep(0.05)
            return got
        finally:
            await link.close()
            await proxy.close()

    got = asyncio.run(main())
    assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.CANCELLED


def test_bad_frames_get_an_error_and_the_link_stays_open(serve: Serve) -> None:
    core = serve(FakeReplica(MODEL))

    async def main() -> list[str]:
        codes = []
        async with connect(core.base.replace("http", "ws") + "/v1/link") as ws:
            for frame in (b"\x00binary", "not json", "[1]", json.dumps({"op": "launch"}), json.dumps({"op": "submit"})):
                await ws.send(frame)
                while (reply := json.loads(await ws.recv()))["op"] == "status":
                    pass
                codes.append(reply["code"])
            await ws.send(json.dumps({"op": "ping", "t": 1.5}))
            while (reply := json.loads(await ws.recv()))["op"] == "status":
                pass
            assert reply == {"op": "pong", "t": 1.5}
        return codes

    assert asyncio.run(main()) == [
        "binary_frame",
        "invalid_json",
        "invalid_event",
        "unknown_event_type",
        "invalid_event",
    ]
    assert core.errors == []


def test_a_cut_link_resumes_each_response_from_its_last_delta(serve: Serve) -> None:
    words = tuple(f" w{i}" for i in range(40))
    core = serve(FakeReplica(MODEL, reply=words, delay=0.05), resume_window_s=20)

    async def main() -> tuple[list[ResponseEvent], int]:
        proxy = Proxy("127.0.0.1", int(core.base.rsplit(":", 1)[1]))
        await proxy.start()
        link = await linked(f"http://127.0.0.1:{proxy.port}", ping_interval_s=0.2, ping_timeout_s=0.6)
        try:
            stream = await link.submit(request("long"))
            got: list[ResponseEvent] = []
            async for event in stream:
                got.append(event)
                if len(got) == 5:
                    proxy.cut("blackhole")
                    while link.connected:  # the missed pongs drop the connection
                        await asyncio.sleep(0.05)
                    proxy.restore()
            return got, link.connects
        finally:
            await link.close()
            await proxy.close()

    got, connects = asyncio.run(main())
    assert "".join(e.text for e in got if isinstance(e, TokenEvent)) == "".join(words)  # nothing lost or repeated
    assert [e.index for e in got if isinstance(e, TokenEvent)] == list(range(len(words)))
    assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.STOP
    assert connects == 2


def test_a_submit_while_the_core_is_unreachable_is_a_clear_error() -> None:
    async def main() -> None:
        link = Link(f"http://127.0.0.1:{free_port()}")
        await link.start()
        try:
            assert not await link.wait_connected(0.5)
            with pytest.raises(CoreUnreachable, match="unreachable"):
                await link.submit(request("r"))
        finally:
            await link.close()

    asyncio.run(main())


def test_a_core_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="--core"):
        Link("redis://core:6379")
