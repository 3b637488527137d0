"""`blink serve` and `blink worker`: check what they are asked to serve, wire the parts, run until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blink.cli.flags import from_flags
from blink.config import (
    REDIS_PASSWORD_ENV,
    UPSTREAM_API_KEY_ENV,
    CacheConfig,
    EngineConfig,
    GatewayConfig,
    ModelConfig,
    RedisConfig,
    ServeConfig,
    kv_cache_bytes,
    parse_speculative,
)

if TYPE_CHECKING:
    from blink.bus.base import Bus
    from blink.gateway.keys import Authenticator
    from blink.gateway.service import Gateway
    from blink.semantic_cache.embedder import LazyEmbedder
    from blink.worker.replica import Replica
    from blink.worker.upstream import UpstreamReplica

log = logging.getLogger("blink")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The flags, and the upstream's API key from the environment (never a flag: argv is visible to every user)."""
    key = next((os.environ[name] for name in UPSTREAM_API_KEY_ENV if os.environ.get(name)), "")
    return dataclasses.replace(from_flags(EngineConfig, args), upstream_api_key=key)


def served_name(model: ModelConfig, engine: EngineConfig) -> str:
    """The pool's name, the `model` clients give: an upstream's model id unless --served-model-name says."""
    if engine.engine == "openai" and not model.served_model_name and engine.upstream_model:
        return engine.upstream_model
    return model.served_name()


def _replica(bus: Bus, model: ModelConfig, engine: EngineConfig) -> Replica | UpstreamReplica:
    """The replica --engine asks for: blink's own engine on this machine, vLLM's in this process, or one driving an
    upstream server."""
    if engine.engine == "vllm":
        from blink.models import source
        from blink.worker.engines import vllm
        from blink.worker.upstream import UpstreamReplica

        kind, draft = parse_speculative(engine.speculative)
        vllm_engine = vllm.VLLMEngine(
            source.resolve(model.model).locate(model.cache_dir),
            max_model_len=engine.max_model_len,
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            kv_cache_mb=engine.kv_cache_mb,
            block_size=engine.block_size,
            prefix_caching=engine.prefix_caching,
            speculative=vllm.speculative_config(
                kind, str(source.resolve(draft).locate(model.cache_dir)) if draft else "", engine.speculative_tokens
            ),
            extra_args=vllm.parse_args(engine.vllm_args),
        )
        # twice its batch: vLLM has the next requests queued when one ends (the rest waits on the bus)
        return UpstreamReplica(bus, vllm_engine, served_name(model, engine), max_concurrent=2 * engine.max_num_seqs)
    if engine.engine == "openai":
        from blink.worker.engines.openai import OpenAIUpstream
        from blink.worker.upstream import UpstreamReplica

        upstream = OpenAIUpstream(
            engine.upstream, engine.upstream_model, api_key=engine.upstream_api_key, max_model_len=engine.max_model_len
        )
        return UpstreamReplica(bus, upstream, served_name(model, engine), max_concurrent=engine.max_num_seqs)
    from blink.worker.replica import Replica

    return Replica(bus, model, engine)


def _check_upstream(engine: EngineConfig) -> str | None:
    """Why --engine openai cannot start (no usable --upstream URL); None if it can."""
    from urllib.parse import urlsplit

    url = urlsplit(engine.upstream)
    if url.scheme not in ("http", "https") or not url.netloc:
        return f"--engine openai needs --upstream http(s)://host:port (got {engine.upstream!r})"
    return None


def _check_vllm(model: ModelConfig, engine: EngineConfig) -> str | None:
    """Why --engine vllm cannot serve --model (vLLM missing, not a Hugging Face folder, bad --vllm-args or draft)."""
    from blink.errors import BlinkError
    from blink.models import source
    from blink.worker.engines import vllm

    try:
        problem = vllm.check(source.resolve(model.model).locate(model.cache_dir), engine.vllm_args)
        kind, draft = parse_speculative(engine.speculative)
        if problem is None and kind == "draft":
            problem = vllm.check(source.resolve(draft).locate(model.cache_dir), "")
    except BlinkError as exc:
        return exc.message
    except ValueError as exc:
        return str(exc)
    return problem


def _check_engine(model: ModelConfig, engine: EngineConfig) -> str | None:
    """Why the replica --engine asks for cannot start; None if it can."""
    if engine.engine == "openai":
        return _check_upstream(engine)
    if engine.engine == "vllm":
        return _check_vllm(model, engine)
    return _preflight(model, engine)


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
    """Why the model (a bundled name, a .gguf file or a model folder), its draft or the --shared-prefixes file cannot
    be served, before anything starts; None if it can."""
    from blink.errors import BlinkError
    from blink.models import registry, source

    try:
        source.resolve(model.model).locate(model.cache_dir)  # before torch is imported: a bad path is quick
        kind, draft = parse_speculative(engine.speculative)
        if kind == "draft":
            registry.get(draft).locate(model.cache_dir)
        if engine.shared_prefixes:
            from blink.worker import shared_prefixes

            shared_prefixes.read(engine.shared_prefixes)
        from blink.models import inspection  # its architecture, its context and the KV cache it needs, from headers

        limits = {"max_model_len": engine.max_model_len, "kv_cache_mb": engine.kv_cache_mb}
        info = inspection.report(
            model.model, model.cache_dir, **limits, kv_dtype_bytes=kv_cache_bytes(engine.weights, engine.kv_cache_dtype)
        )
        if not info["servable"]:
            return str(info["reason"])
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

    if not redis.redis:
        print("blink worker: --redis is required (the bus the gateways use)", file=sys.stderr)
        return 2
    problem = _bad_redis_url(redis) or _check_engine(model, engine)
    if problem is not None:
        print(f"blink: {problem}", file=sys.stderr)
        return 2
    gw = GatewayConfig()
    what = engine.upstream if engine.engine == "openai" else model.model
    log.info("worker: %s, served as %r (the pool gateways route to)", what, served_name(model, engine))

    async def main() -> None:
        bus = _bus(redis, gw.max_pending_requests, gw.stream_queue_events)
        await bus.start()
        replica = _replica(bus, model, engine)
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
    from blink.gateway.server import http_server
    from blink.gateway.service import Gateway
    from blink.gateway.sessions import RedisSessions
    from blink.preload.store import MemoryContextStore, TenantStores
    from blink.semantic_cache.cache import open_cache
    from blink.semantic_cache.embedder import LazyEmbedder

    local = config.redis.local_replica or not config.redis.redis
    if not config.redis.local_replica and not config.redis.redis:
        print("blink serve: --no-local-replica needs --redis (workers join through it)", file=sys.stderr)
        return 2
    problem = _bad_redis_url(config.redis, config.cache)
    if problem is None and local:
        problem = _check_engine(config.model, config.engine)
    if problem is not None:
        print(f"blink: {problem}", file=sys.stderr)
        return 2
    gw = config.gateway
    auth = _authenticator(gw)
    if auth is None:
        return 2
    bus = _bus(config.redis, gw.max_pending_requests, gw.stream_queue_events)
    embedder = LazyEmbedder(config.cache.cache_embedder, config.model.cache_dir, config.cache.cache_embedder_threads)
    cache = open_cache(config.cache, config.redis, embedder.loaded) if config.cache.semantic_cache else None
    password = config.redis.redis_password or None
    sessions = RedisSessions(config.redis.redis, gw.session_ttl_s, password=password) if config.redis.redis else None
    documents = TenantStores(lambda: MemoryContextStore(embedder.embed))
    name = served_name(config.model, config.engine)
    replica = _replica(bus, config.model, config.engine) if local else None  # on the local bus, an edge's too
    if config.edge is None:
        gateway = Gateway(bus, gw, [name], documents, cache, sessions, auth)
    else:
        from blink.cli.edge import edge_gateway

        edge = edge_gateway(config, bus, name, documents, cache, sessions, auth)
        if edge is None:
            return 2
        gateway, bus = edge

    lifespan = _lifespan(config, bus, gateway, replica, embedder)
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


def _lifespan(
    config: ServeConfig, bus: Bus, gateway: Gateway, replica: Replica | UpstreamReplica | None, embedder: LazyEmbedder
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """What `blink serve` starts beside the HTTP server, and stops after it: the bus, the local replica (drained,
    or with --redis handed back), the semantic cache's embedder, the session store."""
    cache = gateway.cache

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await bus.start()
        task = asyncio.create_task(replica.run() if replica else asyncio.sleep(0))
        task.add_done_callback(_report_replica_exit)
        if cache is not None:  # /readyz waits for it; the document store alone loads it at its first document
            loading = asyncio.create_task(asyncio.to_thread(embedder.load))
            loading.add_done_callback(_report_embedder)
        model = config.model
        where = f"http://{config.gateway.host}:{config.gateway.port}"
        name = served_name(model, config.engine)
        if config.edge is not None:
            log.info(
                "edge listening on %s; serving %r here and the core's models from %s", where, name, config.edge.core
            )
        if replica is None:
            log.info("listening on %s; serving %r from the workers on the bus", where, name)
        else:
            what = config.engine.upstream if config.engine.engine == "openai" else model.model
            log.info("listening on %s; loading %s, served as %r", where, what, name)
        yield
        if replica is not None:  # with --redis it may hold other gateways' requests: drained, or handed back
            await replica.stop(drain_s=config.redis.drain_timeout_s if config.redis.redis else 0.0)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if cache is not None:
            await cache.close()
        await gateway.session_store.close()
        await bus.close()

    return lifespan


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


def _report_embedder(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedding model did not load; the semantic cache stays off: %r", task.exception())


def _report_replica_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the replica stopped: %r", task.exception())
