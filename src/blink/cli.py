"""The `blink` command: the only place that reads flags and the environment, and wires the parts together.

blink serve     gateway + in-memory bus + one pre-warmed replica, in one process
blink prepare   convert the model once into the cache (serve does this too when needed)
blink models    list the models this installation can serve
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from blink import __version__
from blink.config import EngineConfig, GatewayConfig, ModelConfig, ServeConfig, add_flags, from_flags, parse_speculative

if TYPE_CHECKING:
    from blink.gateway.service import Gateway

log = logging.getLogger("blink")

WS_MAX_SIZE_FACTOR = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blink", description="Real-time LLM serving.")
    parser.add_argument("--version", action="version", version=f"blink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the model over WebSocket (/v1/realtime) and OpenAI-compatible HTTP",
        description="Start the gateway, the in-memory event bus and one pre-warmed replica in this process. "
        "/readyz answers 200 once the replica has loaded and warmed its model.",
    )
    for cls in (ModelConfig, EngineConfig, GatewayConfig):
        add_flags(serve, cls)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    prepare = sub.add_parser("prepare", help="prepare a model into the cache (dequantize once, load fast after)")
    add_flags(prepare, ModelConfig)

    sub.add_parser("models", help="list the models this installation can serve")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from blink.models import registry

        for name in registry.names():
            print(name)
        return 0
    if args.command == "prepare":
        from blink.models import loader, registry

        cfg = from_flags(ModelConfig, args)
        print(loader.prepare(registry.get(cfg.model), cfg.cache_dir))
        return 0
    config = ServeConfig(
        model=from_flags(ModelConfig, args),
        engine=from_flags(EngineConfig, args),
        gateway=from_flags(GatewayConfig, args),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config, log_level=args.log_level)


def serve(config: ServeConfig, *, log_level: str = "info") -> int:
    from blink.bus.memory import MemoryBus
    from blink.errors import BlinkError
    from blink.gateway.app import create_app
    from blink.gateway.service import Gateway
    from blink.models import registry
    from blink.preload.store import MemoryContextStore
    from blink.worker.replica import Replica

    try:
        registry.get(config.model.model).locate(config.model.cache_dir)
        kind, draft = parse_speculative(config.engine.speculative)
        if kind == "draft":
            registry.get(draft).locate(config.model.cache_dir)
    except BlinkError as exc:
        print(f"blink: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"blink: {exc}", file=sys.stderr)
        return 2
    gw = config.gateway
    bus = MemoryBus(max_pending=gw.max_pending_requests, stream_events=gw.stream_queue_events)
    gateway = Gateway(bus, gw, [config.model.model], MemoryContextStore(_lazy_embedder()))
    replica = Replica(bus, config.model, config.engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await bus.start()
        task = asyncio.create_task(replica.run())
        task.add_done_callback(_report_replica_exit)
        log.info("listening on http://%s:%d; loading %s", gw.host, gw.port, config.model.model)
        yield
        await replica.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await bus.close()

    http_server(create_app(gateway, lifespan), gateway, log_level=log_level).run()
    return 0


def _lazy_embedder() -> Callable[[list[str]], Any]:
    """The document store's embedding function, loading all-MiniLM-L6-v2 at its first use (the first document),
    so a server that stores none never pays its memory or start-up."""
    lock = threading.Lock()
    loaded: list[Any] = []

    def embed(texts: list[str]) -> Any:
        with lock:
            if not loaded:
                from blink.models.bert import Embedder

                loaded.append(Embedder.load())
        return loaded[0].embed(texts)

    return embed


def http_server(app: Any, gateway: Gateway, *, log_level: str = "info") -> uvicorn.Server:
    """uvicorn serving `app`, configured from `gateway.config`.

    WebSocket messages: the gateway answers one over `max_request_bytes` with an `error` event and the session
    stays open, so uvicorn lets such messages through; only one over WS_MAX_SIZE_FACTOR times the limit is refused
    by uvicorn itself (close code 1009, before its payload is buffered), which bounds a connection's memory."""
    gw = gateway.config
    config = uvicorn.Config(
        app,
        host=gw.host,
        port=gw.port,
        log_level=log_level,
        ws="websockets-sansio",  # the implementation whose limits the docstring describes
        ws_max_size=WS_MAX_SIZE_FACTOR * gw.max_request_bytes,
        timeout_graceful_shutdown=int(gw.shutdown_grace_s) + 5,
    )
    return _Server(config, gateway)


def _report_replica_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the replica stopped: %r", task.exception())


class _Server(uvicorn.Server):
    """uvicorn closes WebSockets (1012) as soon as its shutdown starts; drain our streams before that, so each
    in-flight response first ends with response.done (status incomplete)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: Any = None) -> None:
        await self._gateway.shutdown()
        await super().shutdown(sockets)


if __name__ == "__main__":
    sys.exit(main())
