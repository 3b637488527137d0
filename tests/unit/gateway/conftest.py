"""The real gateway on a real socket (uvicorn as `blink serve` configures it), with scripted replicas on the
memory bus instead of models: fast, and each test sets what the replicas do and reads what they were asked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blink.bus.memory import MemoryBus
from blink.bus.messages import (
    Accepted,
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    TokenEvent,
)
from blink.config import GatewayConfig
from blink.gateway.app import create_app
from blink.gateway.keys import KeyFile
from blink.gateway.server import http_server
from blink.gateway.service import Gateway
from blink.gateway.sessions import SessionStore
from blink.preload.store import MemoryContextStore, TenantStores
from tests.unit.preload.fakes import HashEmbedder

MODEL = "model-a"
OTHER = "model-b"
T = TypeVar("T")


@dataclass
class FakeReplica:
    """Answers each request with `reply` (one TokenEvent a piece, all published at once, or `delay` s apart) and
    `finish`; with `hold`, answers nothing after Accepted until it is cancelled or `stop()`ped."""

    model: str
    max_model_len: int = 2048
    state: ReplicaState = ReplicaState.READY
    reply: tuple[str, ...] = ("Hello", " there")
    finish: FinishStatus = FinishStatus.STOP
    hold: bool = False
    delay: float = 0.0
    queue_wait_s: float = 0.0
    prefixes: tuple[str, ...] = ()  # affinity keys its heartbeats say it holds
    requests: list[GenerateRequest] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    replica_id: str = ""

    def __post_init__(self) -> None:
        self.replica_id = self.replica_id or f"fake-{self.model}"

    async def run(self, bus: MemoryBus) -> None:
        while True:
            await bus.heartbeat(
                ReplicaStatus(
                    self.replica_id,
                    self.model,
                    self.state,
                    max_model_len=self.max_model_len,
                    queue_wait_s=self.queue_wait_s,
                    prefixes=self.prefixes,
                )
            )
            for message in await bus.receive(self.model, self.replica_id, wait=0.05, max_requests=8):
                if isinstance(message, GenerateRequest):
                    await self._answer(bus, message)
                elif isinstance(message, Cancel) and message.request_id in self.held:
                    self.held.remove(message.request_id)
                    await bus.publish(Finished(message.request_id, FinishStatus.CANCELLED))

    async def _answer(self, bus: MemoryBus, req: GenerateRequest) -> None:
        self.requests.append(req)
        await bus.publish(Accepted(req.request_id, self.replica_id, prompt_tokens=7))
        if self.hold:
            self.held.append(req.request_id)
            return
        for i, text in enumerate(self.reply):
            if self.delay:
                await asyncio.sleep(self.delay)
            if not await bus.publish(TokenEvent(req.request_id, i, text, i + 1)):
                return
        await bus.publish(
            Finished(
                req.request_id,
                self.finish,
                prompt_tokens=7,
                completion_tokens=len(self.reply),
                timings={"decode_ms": 1.0},
            )
        )

    async def stop(self, bus: MemoryBus) -> None:
        """What a real replica does when it stops: every request it holds ends as cancelled."""
        for request_id in self.held:
            await bus.publish(Finished(request_id, FinishStatus.CANCELLED))
        self.held.clear()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class LiveServer:
    """`errors`: what the server logged at ERROR (uvicorn reports an exception escaping the app there)."""

    def __init__(
        self,
        replicas: list[FakeReplica],
        config: GatewayConfig,
        store: TenantStores | None = None,
        session_store: SessionStore | None = None,
    ) -> None:
        self.replicas = replicas
        self.bus = MemoryBus(max_pending=config.max_pending_requests, stream_events=config.stream_queue_events)
        models = list(dict.fromkeys(r.model for r in replicas))
        auth = KeyFile(Path(config.api_keys)) if config.api_keys else None
        self.gateway = Gateway(self.bus, config, models, store, session_store=session_store, auth=auth)
        self.loop = asyncio.new_event_loop()
        self.server = http_server(create_app(self.gateway, self._lifespan), self.gateway, log_level="warning")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.base = self.ws_url = ""

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(r.run(self.bus)) for r in self.replicas]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.gateway.session_store.close()

    def _serve(self) -> None:
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    @property
    def errors(self) -> list[str]:
        return self._errors.messages

    def start(self) -> None:
        self._errors = _Errors()
        for name in ("uvicorn.error", "blink"):
            logging.getLogger(name).addHandler(self._errors)
        self._thread.start()
        while not self.server.started:
            assert self._thread.is_alive(), "the server did not start"
            threading.Event().wait(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base, self.ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime"

    def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10) -> T:
        """Run a coroutine on the server's event loop (where the gateway and the bus live)."""
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        for name in ("uvicorn.error", "blink"):
            logging.getLogger(name).removeHandler(self._errors)


def make_keys(path: Path, *tenants: str, **limits: Any) -> dict[str, str]:
    """A keys file at `path` with one key per tenant (each with `limits`); {tenant: its key}."""
    keys = KeyFile(path)
    return {tenant: keys.add(tenant, limits=limits)[1] for tenant in tenants}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """`serve(*replicas, documents=False, session_store=None, **gateway_config)` starts a live gateway
    (`documents`: with a document store, its embedder a hashing fake); it stops when the test ends."""
    started: list[LiveServer] = []

    def start(
        *replicas: FakeReplica, documents: bool = False, session_store: SessionStore | None = None, **config: Any
    ) -> LiveServer:
        store = TenantStores(lambda: MemoryContextStore(HashEmbedder())) if documents else None
        config_ = GatewayConfig(port=0, **config)
        server = LiveServer(list(replicas) or [FakeReplica(MODEL)], config_, store, session_store)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
