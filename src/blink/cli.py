"""The `blink` command: the only place that reads flags and the environment, and wires the parts together.

blink serve       gateway + in-memory bus + one pre-warmed replica, in one process (--redis: on Redis Streams)
blink worker      a replica alone, serving the gateways of a Redis bus (--redis)
blink prepare     convert the model (and the embedding model) once into the cache (serve does this when needed)
blink models      list the models this installation can serve
blink cache-eval  measure the semantic cache on a labelled pair file
blink bench       drive a running server with simulated interactive users; report latencies (ws or sse)
blink keys        add, list and revoke API keys (each names a tenant and its limits) in a keys file
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from blink import __version__
from blink.config import (
    REDIS_PASSWORD_ENV,
    BenchConfig,
    CacheConfig,
    EngineConfig,
    GatewayConfig,
    HelpAll,
    ModelConfig,
    RedisConfig,
    ServeConfig,
    TenantLimits,
    add_flags,
    from_flags,
    parse_speculative,
)

if TYPE_CHECKING:
    from blink.bus.base import Bus
    from blink.gateway.keys import Authenticator
    from blink.gateway.service import Gateway
    from blink.semantic_cache.cache import SemanticCache
    from blink.semantic_cache.embedder import LazyEmbedder

log = logging.getLogger("blink")

WS_MAX_SIZE_FACTOR = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blink", description="Real-time LLM serving.")
    parser.add_argument("--version", action="version", version=f"blink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the model over WebSocket (/v1/realtime) and OpenAI-compatible HTTP",
        description="Start the gateway, the in-memory event bus and one pre-warmed replica in this process "
        "(with --redis: the bus is Redis Streams, which `blink worker` processes join; --no-local-replica leaves "
        "this process a gateway only). /readyz answers 200 once a replica has loaded and warmed its model.",
    )
    for cls in (ModelConfig, EngineConfig, GatewayConfig, CacheConfig, RedisConfig):
        add_flags(serve, cls)
    serve.add_argument("--help-all", action=HelpAll)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    worker = sub.add_parser(
        "worker",
        help="run a replica that serves the gateways of a Redis bus (blink serve --redis)",
        description="Load and warm the model, then join the model's pool on the Redis bus: take requests, stream "
        "tokens back, send heartbeats. SIGTERM or SIGINT stops it: it takes no new requests, finishes those it "
        "holds for up to --drain-timeout-s, and hands the rest back to the other workers, which continue them.",
    )
    for cls in (ModelConfig, EngineConfig, RedisConfig):
        add_flags(worker, cls, skip=("local_replica",))
    worker.add_argument("--help-all", action=HelpAll)
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    prepare = sub.add_parser(
        "prepare", help="prepare a model into the cache (dequantize once, load fast after), and the embedding model"
    )
    add_flags(prepare, ModelConfig)

    evaluate = sub.add_parser(
        "cache-eval",
        help="measure the semantic cache on a labelled pair file",
        description="For each line {a, b, label} of PAIRS (JSON Lines; label 1: b may be answered with a's answer, "
        "0: it may not), store a in a scope of its own, then look up b. Prints the hit rate on positives, the "
        "false-hit rate on negatives, the precision of hits and lookup latency percentiles (embedding included).",
    )
    evaluate.add_argument("pairs", type=Path, metavar="PAIRS", help="JSON Lines file of {a, b, label}")
    evaluate.add_argument("--cache-dir", type=Path, default=ModelConfig().cache_dir, help="where the embedder is kept")
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    for cls in (CacheConfig, RedisConfig):
        add_flags(evaluate, cls, skip=("semantic_cache", "cache_turns", "cache_max_entries", "local_replica"))

    sub.add_parser("models", help="list the models this installation can serve")

    _keys_parser(sub)

    bench = sub.add_parser(
        "bench",
        help="load-test a running blink (ws) or any OpenAI-compatible server (sse); write a latency report",
        description="Simulated users type (input_text.draft), open documents, submit, sometimes interrupt; they "
        "arrive from a trace, at a Poisson rate, or as a closed-loop concurrency ramp. Prints TTFT, inter-token "
        "latency, tokens/s and errors, and writes NAME.md, NAME.html (plots) and NAME.json into --out. With --url2, "
        "the second server gets the same sessions after the first, and the report puts them side by side.",
    )
    add_flags(bench, BenchConfig)
    return parser


def _keys_parser(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="add, list and revoke API keys (each names a tenant and its limits)",
        description="Manage the API keys file that `blink serve --api-keys FILE` (or BLINK_API_KEYS) reads. Only a "
        "salted hash of each key is stored; `add` prints the key once, alone on its last line. A running server "
        "sees every change at once.",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a key for TENANT (and set the tenant's limits given)")
    add.add_argument("tenant", metavar="TENANT", help="the tenant's name: 1-64 letters, digits, '.', '_', '-'")
    add.add_argument("--admin", action="store_true", help="the key may act for every tenant (cache invalidation)")
    for f in dataclasses.fields(TenantLimits):
        add.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=None,
            metavar="N",
            help=f"{f.metadata['help']} (0: no limit; default {f.default}, or the file's `defaults`)",
        )
    actions.add_parser("list", help="list the keys: id, tenant, admin, created, the tenant's limits")
    revoke = actions.add_parser("revoke", help="remove a key (by its id, or the key itself)")
    revoke.add_argument("key_id", metavar="KEY_ID")
    for parser in (add, *actions.choices.values()):
        if not any(a.dest == "file" for a in parser._actions):
            parser.add_argument("--file", type=Path, default=None, help="the keys file (default: $BLINK_API_KEYS)")


def keys_command(args: argparse.Namespace) -> int:
    from blink.gateway.keys import KeyFile

    path = args.file or os.environ.get("BLINK_API_KEYS")
    if not path:
        print("blink keys: name the keys file with --file FILE (or BLINK_API_KEYS)", file=sys.stderr)
        return 2
    try:
        keys = KeyFile(Path(path))
        if args.action == "add":
            limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(TenantLimits)}
            key_id, key = keys.add(
                args.tenant, admin=args.admin, limits={k: v for k, v in limits.items() if v is not None}
            )
            print(f"added key {key_id} for tenant {args.tenant!r} to {path}; the key (shown only now):")
            print(key)
        elif args.action == "list":
            for entry in keys.list():
                print(json.dumps(entry))
        elif not keys.revoke(args.key_id):
            print(f"blink keys: no key {args.key_id!r} in {path}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}")
    except ValueError as exc:
        print(f"blink keys: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # numpy's BLAS must not start a thread pool of its own: on a loaded machine a cache search (one matrix-vector
    # product) took 5-8 ms with OpenBLAS threads against 0.7 ms on one thread. Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from blink.models import registry

        for name in registry.names():
            print(name)
        return 0
    if args.command == "prepare":
        from blink.models import loader, registry
        from blink.semantic_cache.embedder import onnx_files

        cfg = from_flags(ModelConfig, args)
        print(loader.prepare(registry.get(cfg.model), cfg.cache_dir))
        print(onnx_files(cfg.cache_dir, int8=True)[0].parent)  # the fp32 export and its int8 form
        return 0
    if args.command == "cache-eval":
        from blink.semantic_cache.evaluate import run

        cache, redis = from_flags(CacheConfig, args), _redis_config(args)
        problem = _bad_redis_url(redis, cache)
        if problem is not None:
            print(f"blink: {problem}", file=sys.stderr)
            return 2
        return run(args.pairs, cache, redis, args.cache_dir, args.json)
    if args.command == "bench":
        from blink.bench.runner import main as bench

        return bench(from_flags(BenchConfig, args))
    if args.command == "keys":
        return keys_command(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        return worker(from_flags(ModelConfig, args), from_flags(EngineConfig, args), _redis_config(args))
    gateway = from_flags(GatewayConfig, args)
    if not gateway.api_keys and os.environ.get("BLINK_API_KEYS"):
        gateway = dataclasses.replace(gateway, api_keys=os.environ["BLINK_API_KEYS"])
    config = ServeConfig(
        model=from_flags(ModelConfig, args),
        engine=from_flags(EngineConfig, args),
        gateway=gateway,
        cache=from_flags(CacheConfig, args),
        redis=_redis_config(args),
    )
    return serve(config, log_level=args.log_level)


def _redis_config(args: argparse.Namespace) -> RedisConfig:
    """The flags, and the password from the environment (never a flag: argv is visible to every user)."""
    password = next((os.environ[name] for name in REDIS_PASSWORD_ENV if os.environ.get(name)), "")
    return dataclasses.replace(from_flags(RedisConfig, args), redis_password=password)


def _bad_redis_url(redis: RedisConfig, cache: CacheConfig | None = None) -> str | None:
    """Why a Redis URL given cannot be used (its password never shown), before anything starts; None if all can."""
    from blink.bus.redis_wire import check_url

    for flag, url in (("--redis", redis.redis), ("--cache-redis", cache.cache_redis if cache else "")):
        try:
            if url:
                check_url(url)
        except ValueError as exc:
            return f"{flag}: {exc}"
    return None


def _preflight(model: ModelConfig, engine: EngineConfig) -> str | None:
    """Why the model (or its draft, or the --shared-prefixes file) cannot be served, before anything starts; None if
    it can."""
    from blink.errors import BlinkError
    from blink.models import registry

    try:
        registry.get(model.model).locate(model.cache_dir)
        kind, draft = parse_speculative(engine.speculative)
        if kind == "draft":
            registry.get(draft).locate(model.cache_dir)
        if engine.shared_prefixes:
            from blink.worker import shared_prefixes

            shared_prefixes.read(engine.shared_prefixes)
    except BlinkError as exc:
        return exc.message
    except ValueError as exc:
        return str(exc)
    return None


def _bus(redis: RedisConfig, max_pending: int, stream_events: int) -> Bus:
    if redis.redis:
        from blink.bus.redis import RedisBus

        password = redis.redis_password or None
        return RedisBus(redis.redis, password=password, max_pending=max_pending, stream_events=stream_events)
    from blink.bus.memory import MemoryBus

    return MemoryBus(max_pending=max_pending, stream_events=stream_events)


def worker(model: ModelConfig, engine: EngineConfig, redis: RedisConfig) -> int:
    """`blink worker`: one replica on the Redis bus, until SIGTERM or SIGINT."""
    import signal

    from blink.worker.replica import Replica

    if not redis.redis:
        print("blink worker: --redis is required (the bus the gateways use)", file=sys.stderr)
        return 2
    problem = _bad_redis_url(redis) or _preflight(model, engine)
    if problem is not None:
        print(f"blink: {problem}", file=sys.stderr)
        return 2
    gw = GatewayConfig()

    async def main() -> None:
        bus = _bus(redis, gw.max_pending_requests, gw.stream_queue_events)
        await bus.start()
        replica = Replica(bus, model, engine)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(replica.run())
        await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        await replica.stop(drain_s=redis.drain_timeout_s)
        try:
            await task
        finally:
            await bus.close()

    if not _tracing("blink-worker"):
        return 2
    try:
        asyncio.run(main())
    finally:
        from blink.telemetry import tracing

        tracing.shutdown()
    return 0


def _tracing(service: str) -> bool:
    """OpenTelemetry tracing from the standard environment: OTEL_TRACES_EXPORTER=otlp|console turns it on (off by
    default: unset or none); the SDK reads OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME and the rest itself.
    False (after saying why) when the variable names an exporter blink does not have."""
    from blink.telemetry import tracing

    try:
        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        tracing.setup(exporter, os.environ.get("OTEL_SERVICE_NAME") or service)
    except ValueError as exc:
        print(f"blink: {exc}", file=sys.stderr)
        return False
    return True


def serve(config: ServeConfig, *, log_level: str = "info") -> int:
    from blink.gateway.app import create_app
    from blink.gateway.browser import wildcard_bind_warning
    from blink.gateway.service import Gateway
    from blink.gateway.sessions import RedisSessions
    from blink.preload.store import MemoryContextStore, TenantStores
    from blink.semantic_cache.embedder import LazyEmbedder
    from blink.worker.replica import Replica

    local = config.redis.local_replica or not config.redis.redis
    if not config.redis.local_replica and not config.redis.redis:
        print("blink serve: --no-local-replica needs --redis (workers join through it)", file=sys.stderr)
        return 2
    problem = _bad_redis_url(config.redis, config.cache)
    if problem is None and local:
        problem = _preflight(config.model, config.engine)
    if problem is not None:
        print(f"blink: {problem}", file=sys.stderr)
        return 2
    gw = config.gateway
    auth = _authenticator(gw)
    if auth is None:
        return 2
    bus = _bus(config.redis, gw.max_pending_requests, gw.stream_queue_events)
    embedder = LazyEmbedder(config.cache.cache_embedder, config.model.cache_dir, config.cache.cache_embedder_threads)
    cache = _semantic_cache(config.cache, config.redis, embedder) if config.cache.semantic_cache else None
    password = config.redis.redis_password or None
    sessions = RedisSessions(config.redis.redis, gw.session_ttl_s, password=password) if config.redis.redis else None
    documents = TenantStores(lambda: MemoryContextStore(embedder.embed))
    gateway = Gateway(bus, gw, [config.model.model], documents, cache, sessions, auth)
    replica = Replica(bus, config.model, config.engine) if local else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await bus.start()
        task = asyncio.create_task(replica.run() if replica else asyncio.sleep(0))
        task.add_done_callback(_report_replica_exit)
        if cache is not None:  # /readyz waits for it; the document store alone loads it at its first document
            loading = asyncio.create_task(asyncio.to_thread(embedder.load))
            loading.add_done_callback(_report_embedder)
        log.info("listening on http://%s:%d; loading %s", gw.host, gw.port, config.model.model)
        yield
        if replica is not None:  # with --redis it may hold other gateways' requests: drained, or handed back
            await replica.stop(drain_s=config.redis.drain_timeout_s if config.redis.redis else 0.0)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if cache is not None:
            await cache.close()
        await gateway.session_store.close()
        await bus.close()

    try:
        app = create_app(gateway, lifespan)
    except ValueError as exc:  # a browser-facing flag (--allowed-hosts, --allowed-origins, ...) that is not one
        print(f"blink: {exc}", file=sys.stderr)
        return 2
    warning = wildcard_bind_warning(gw)
    if warning is not None:
        log.warning("%s", warning)
    if not _tracing("blink-gateway" if not local else "blink"):
        return 2
    try:
        http_server(app, gateway, log_level=log_level).run()
    finally:
        from blink.telemetry import tracing

        tracing.shutdown()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _authenticator(gw: GatewayConfig) -> Authenticator | None:
    """The keys file's authenticator, or an open server's (loopback only, unless --allow-unauthenticated); None
    after saying why the server must not start."""
    from blink.gateway.keys import KeyFile, OpenAccess

    if gw.api_keys:
        try:
            keys = KeyFile(Path(gw.api_keys))
        except ValueError as exc:
            print(f"blink: {exc}", file=sys.stderr)
            return None
        log.info("API keys from %s: %d tenant(s)", gw.api_keys, len(keys.tenants()))
        return keys
    if not _loopback(gw.host) and not gw.allow_unauthenticated:
        print(
            f"blink serve: no API keys (--api-keys FILE or BLINK_API_KEYS; `blink keys add` makes them), and --host "
            f"{gw.host} is not a loopback address: anyone reaching it would use this server. Add keys, or pass "
            "--allow-unauthenticated if that is what you want.",
            file=sys.stderr,
        )
        return None
    log.warning(
        "no API keys (--api-keys FILE or BLINK_API_KEYS): blink runs open, every client is the one tenant %r",
        OpenAccess().tenant.name,
    )
    return OpenAccess()


def _semantic_cache(config: CacheConfig, redis: RedisConfig, embedder: LazyEmbedder) -> SemanticCache:
    from blink.semantic_cache.cache import SemanticCache
    from blink.semantic_cache.index import VectorIndex

    index: VectorIndex
    url = config.cache_redis or redis.redis
    if url:
        from blink.semantic_cache.redis import RedisIndex

        index = RedisIndex(url, config.cache_max_entries, password=redis.redis_password or None)
    else:
        from blink.semantic_cache.memory import MemoryIndex

        index = MemoryIndex(config.cache_max_entries)
    return SemanticCache(index, embedder.loaded, config)


def _report_embedder(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedding model did not load; the semantic cache stays off: %r", task.exception())


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
