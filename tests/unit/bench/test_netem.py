"""The netem proxy in front of a real echo server on 127.0.0.1. Timings are asserted as lower bounds only."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from blink.bench import netem
from blink.bench.netem import Proxy

EOF_MARK = b"<eof>"
CONNECTED = b"<connected>"


@contextlib.asynccontextmanager
async def echo_server(received: list[bytes] | None = None) -> AsyncIterator[int]:
    """Echoes what it reads; at the client's EOF it writes EOF_MARK (its half is still open) and closes.
    `received` gets CONNECTED for each connection, then the bytes read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if received is not None:
            received.append(CONNECTED)
        try:
            while data := await reader.read(65536):
                if received is not None:
                    received.append(data)
                writer.write(data)
                await writer.drain()
            writer.write(EOF_MARK)
            await writer.drain()
        except ConnectionError:
            pass  # the proxy reset this connection: nothing left to echo
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def proxied(received: list[bytes] | None = None, **link: Any) -> AsyncIterator[Proxy]:
    async with echo_server(received) as port:
        proxy = Proxy("127.0.0.1", port, seed=7, **link)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.close()


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> float:
    start = time.perf_counter()
    writer.write(payload)
    _, echoed = await asyncio.gather(writer.drain(), asyncio.wait_for(reader.readexactly(len(payload)), 10))
    assert echoed == payload
    return time.perf_counter() - start


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the peer closed (EOF) or reset the connection within 2 s."""
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:
        return True


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.01)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_delay_is_one_way_per_direction_and_can_change_while_running() -> None:
    async def go() -> None:
        async with proxied() as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer, b"warm")
            proxy.delay_ms = 50.0
            assert await round_trip(reader, writer, b"ping") >= 0.1  # 50 ms out + 50 ms back
            assert proxy.connections == 1 and proxy.bytes_forwarded == 16
            writer.close()

    run(go)


def test_jitter_never_reorders() -> None:
    async def go() -> None:
        async with proxied(delay_ms=5.0, jitter_ms=5.0) as proxy:
            reader, writer = await connect(proxy)
            messages = [f"{i:04d}".encode() for i in range(150)]
            for message in messages:  # one by one, so the proxy reads (and stamps) many separate chunks
                writer.write(message)
                await writer.drain()
                await asyncio.sleep(0.001)
            assert await asyncio.wait_for(reader.readexactly(4 * len(messages)), 10) == b"".join(messages)
            writer.close()

    run(go)


def test_bandwidth_cap_serialises_bytes() -> None:
    async def go() -> None:
        async with proxied(bandwidth_kbps=800.0) as proxy:
            reader, writer = await connect(proxy)
            assert await round_trip(reader, writer, b"x" * 100_000) >= 0.9  # 800 kbit at 800 kbps: 1 s each way
            writer.close()

    run(go)


def test_blackhole_drops_everything_then_restore_closes_and_reconnects() -> None:
    async def go() -> None:
        received: list[bytes] = []
        async with proxied(received) as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer, b"before")
            proxy.cut("blackhole")
            writer.write(b"lost")
            late_reader, late_writer = await connect(proxy)  # accepted, but never reaches the echo server
            late_writer.write(b"late")
            reads = [asyncio.ensure_future(r.read(1)) for r in (reader, late_reader)]
            done, _ = await asyncio.wait(reads, timeout=0.5)
            assert not done, "nothing may come back through a blackhole, not even EOF"
            assert proxy.connections == 1
            proxy.restore()
            for read in reads:
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(read, 2) == b""
            await until(lambda: proxy.connections == 0)
            assert b"".join(received) == CONNECTED + b"before"  # nor did the late connection reach the server
            new_reader, new_writer = await connect(proxy)
            await round_trip(new_reader, new_writer, b"after")
            for w in (writer, late_writer, new_writer):
                w.close()

    run(go)


def test_reset_closes_connections_and_refuses_new_ones_until_restore() -> None:
    async def go() -> None:
        async with proxied() as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer, b"before")
            proxy.cut("reset")
            assert await closed_by_peer(reader)
            assert proxy.connections == 0
            new_reader, new_writer = await connect(proxy)
            assert await closed_by_peer(new_reader)
            proxy.restore()
            ok_reader, ok_writer = await connect(proxy)
            await round_trip(ok_reader, ok_writer, b"after")
            for w in (writer, new_writer, ok_writer):
                w.close()

    run(go)


def test_half_close_is_forwarded_after_the_data_before_it() -> None:
    async def go() -> None:
        async with proxied(delay_ms=20.0) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"hello")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"hello" + EOF_MARK  # the server saw our EOF
            await until(lambda: proxy.connections == 0)
            writer.close()

    run(go)


def test_close_ends_every_connection_and_stops_listening() -> None:
    async def go() -> None:
        async with proxied() as proxy:
            streams = [await connect(proxy) for _ in range(2)]
            for reader, writer in streams:
                await round_trip(reader, writer, b"hi")
            proxy.cut("blackhole")
            streams.append(await connect(proxy))  # held silent: the proxy must close it too
            await asyncio.sleep(0.05)
            await proxy.close()
            for reader, writer in streams:
                assert await closed_by_peer(reader)
                writer.close()
            with pytest.raises(OSError):
                await connect(proxy)

    run(go)


def test_backpressure_stops_reading_when_the_queue_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem, "QUEUE_CAP", 256 * 1024)

    async def go() -> None:
        stop = asyncio.Event()

        async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await stop.wait()
            finally:
                writer.close()

        server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        proxy = Proxy("127.0.0.1", server.sockets[0].getsockname()[1])
        await proxy.start()
        _, writer = await connect(proxy)
        try:
            writer.write(b"x" * (48 << 20))  # far more than the kernel's socket buffers on the way can hold
            await asyncio.sleep(0.5)
            assert writer.transport.get_write_buffer_size() > 0, "the proxy kept reading into memory"
        finally:
            writer.transport.abort()
            stop.set()
            await proxy.close()
            server.close()

    run(go)


def test_unreachable_target_closes_the_client() -> None:
    async def go() -> None:
        async with echo_server() as port:
            pass  # the port is free again: nothing listens there
        proxy = Proxy("127.0.0.1", port)
        await proxy.start()
        reader, writer = await connect(proxy)
        assert await closed_by_peer(reader)
        writer.close()
        await proxy.close()

    run(go)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="cut mode"):
        Proxy("127.0.0.1", 1).cut("unplug")
    with pytest.raises(ValueError):
        Proxy("127.0.0.1", 1, delay_ms=-1)
    with pytest.raises(ValueError):
        Proxy("127.0.0.1", 1, bandwidth_kbps=0)


def test_cli_parses_addresses_and_link_settings() -> None:
    argv = ["--listen", "127.0.0.1:9000", "--target", "10.0.0.2:8000", "--delay-ms", "40", "--jitter-ms", "5"]
    args = netem.parse_args([*argv, "--bandwidth-kbps", "10000"])
    assert (args.listen, args.target) == (("127.0.0.1", 9000), ("10.0.0.2", 8000))
    assert (args.delay_ms, args.jitter_ms, args.bandwidth_kbps) == (40.0, 5.0, 10000.0)
    defaults = netem.parse_args(["--target", ":8000"])
    assert (defaults.listen, defaults.target, defaults.delay_ms, defaults.bandwidth_kbps) == (
        ("127.0.0.1", 0),
        ("127.0.0.1", 8000),
        0.0,
        None,
    )
    for bad in (["--target", "8000"], ["--target", "host:port"], []):
        with pytest.raises(SystemExit):
            netem.parse_args(bad)
