"""A latency-injecting TCP proxy that stands for a WAN link (delay, jitter, a bandwidth cap, outages) in tests and
benchmarks, between an edge and a core server. asyncio only.

Each direction is delayed on its own: `delay_ms` is one-way, so a round trip gains 2 * delay_ms. A chunk read is
stamped due = now + its serialisation time at `bandwidth_kbps` (queued behind the chunk before it) + delay ± a uniform
jitter, and never earlier than the chunk before it, so bytes are never reordered; a writer per direction sleeps
until due. A direction holds at most QUEUE_CAP bytes and stops reading while full, so a slow reader slows the sender
(TCP's backpressure, passed through) instead of growing memory. EOF is forwarded after the data queued before it.

    proxy = Proxy("127.0.0.1", core_port, delay_ms=40, jitter_ms=5)
    await proxy.start()                  # the edge dials proxy.url_host instead of the core
    proxy.cut("blackhole")               # the path goes silent; proxy.restore() brings it back
    await proxy.close()

    python -m blink.bench.netem --listen 127.0.0.1:9000 --target 127.0.0.1:8000 --delay-ms 40 [--jitter-ms 5] \\
        [--bandwidth-kbps 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
from collections.abc import Sequence

CHUNK = 64 * 1024
QUEUE_CAP = 4 * 1024 * 1024  # bytes per direction before the proxy stops reading that side
CUT_MODES = ("blackhole", "reset")

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Direction:
    """One way of a connection: `pump_in` stamps what it reads into the queue, `pump_out` delivers it when due."""

    def __init__(self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.reader, self.writer = proxy, reader, writer
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()  # bounded in bytes by `room`
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.link_free = 0.0  # when the emulated link finishes serialising what is already queued
        self.last_due = 0.0

    def _due(self, n: int) -> float:
        proxy, now = self.proxy, asyncio.get_running_loop().time()
        sent = now
        if proxy.bandwidth_kbps:
            self.link_free = sent = max(now, self.link_free) + n * 8 / (proxy.bandwidth_kbps * 1000)
        jitter = proxy._rng.uniform(-proxy.jitter_ms, proxy.jitter_ms) if proxy.jitter_ms else 0.0
        self.last_due = max(self.last_due, sent + (proxy.delay_ms + jitter) / 1000)
        return self.last_due

    async def pump_in(self) -> None:
        while True:
            await self.room.wait()
            data = await self.reader.read(CHUNK)
            if not data:
                self.queue.put_nowait((self._due(0), None))
                return
            self.queued += len(data)
            if self.queued >= QUEUE_CAP:
                self.room.clear()
            self.queue.put_nowait((self._due(len(data)), data))

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if data is not None:
                self.queued -= len(data)
                if self.queued < QUEUE_CAP:
                    self.room.set()
            if self.proxy._mode == "blackhole":  # in flight or arriving while the path is dead: lost, EOF included
                continue
            if data is None:
                self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.proxy.bytes_forwarded += len(data)


class _Link:
    """One proxied connection: ends when both directions delivered their EOF, or at the first error on either side."""

    def __init__(self, proxy: Proxy, client: Stream, target: Stream) -> None:
        self.writers = (client[1], target[1])
        self.directions = (_Direction(proxy, client[0], target[1]), _Direction(proxy, target[0], client[1]))
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self.tasks = [asyncio.create_task(pump()) for d in self.directions for pump in (d.pump_in, d.pump_out)]
        try:
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)  # a peer's reset is how a link ends, not a bug
            for writer in self.writers:
                writer.close()

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class Proxy:
    """Listens on `listen_host:listen_port` and forwards each connection to the target through an emulated link.

    `delay_ms`, `jitter_ms` and `bandwidth_kbps` may be changed at any time; they apply to data read from then on.
    `connections` counts connections that reach the target (not those held by a blackhole). Call `close` when done:
    it ends every connection and task the proxy started.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        if delay_ms < 0 or jitter_ms < 0 or (bandwidth_kbps is not None and bandwidth_kbps <= 0):
            raise ValueError("delay_ms and jitter_ms must be >= 0 and bandwidth_kbps > 0")
        self.target_host, self.target_port = target_host, target_port
        self.delay_ms, self.jitter_ms, self.bandwidth_kbps = delay_ms, jitter_ms, bandwidth_kbps
        self.listen_host, self.port = listen_host, listen_port
        self.bytes_forwarded = 0
        self._rng = random.Random(seed)
        self._mode: str | None = None  # None, or the mode of the current cut
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()
        self._held: set[asyncio.StreamWriter] = set()  # accepted during a blackhole, never connected

    @property
    def url_host(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self, mode: str = "blackhole") -> None:
        """Breaks the path until `restore`. mode "blackhole": nothing is carried either way and new connections are
        held silent; bytes are dropped, not delayed. "reset": every connection is closed now, new ones on accept."""
        if mode not in CUT_MODES:
            raise ValueError(f"cut mode must be one of {CUT_MODES}, got {mode!r}")
        self._mode = mode
        if mode == "reset":
            self._drop_all()

    def restore(self) -> None:
        """Carries traffic again. Connections that lived through a blackhole lost bytes, so they are closed rather
        than resumed: their peers see EOF and reconnect to a stream they can trust."""
        if self._mode == "blackhole":
            self._drop_all()
        self._mode = None

    def _drop_all(self) -> None:
        for link in list(self._links):
            link.abort()
        for writer in self._held:
            writer.transport.abort()
        self._held.clear()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._served(done, writer))

    def _served(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        """Runs even for a task cancelled before it started, so no client socket is left unclosed."""
        self._tasks.discard(task)
        if writer not in self._held:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = await self._connect((reader, writer))
        if link is not None:
            self._links.add(link)
            try:
                await link.run()
            finally:
                self._links.discard(link)
        elif self._mode == "blackhole":
            self._held.add(writer)

    async def _connect(self, client: Stream) -> _Link | None:
        if self._mode is not None:
            return None
        try:
            target = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:  # the target refused or is unreachable: the client sees its connection closed
            return None
        if self._mode is not None:  # cut while connecting
            target[1].close()
            return None
        _nodelay(target[1])
        return _Link(self, client, target)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m blink.bench.netem", description="emulates a WAN link")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT (default: a free port)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT of the server behind the link")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction (RTT + 2x this)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± jitter on each chunk's delay")
    parser.add_argument("--bandwidth-kbps", type=float, default=None, help="link rate per direction (default: none)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    link = {name: getattr(args, name) for name in ("delay_ms", "jitter_ms", "bandwidth_kbps", "seed")}
    proxy = Proxy(*args.target, listen_host=args.listen[0], listen_port=args.listen[1], **link)
    await proxy.start()
    print(f"netem: listening on {proxy.url_host} -> {args.target[0]}:{args.target[1]} (Ctrl-C stops)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))


if __name__ == "__main__":
    main()
