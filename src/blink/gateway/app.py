"""The ASGI application: routes, error translation, health and readiness.

Only pure ASGI pieces sit on the streaming path (no BaseHTTPMiddleware).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from blink.config import GatewayConfig
from blink.errors import BlinkError, CacheUnavailable, InvalidRequest, MethodNotAllowed, NotFound, PermissionDenied
from blink.gateway import browser
from blink.gateway.auth import AuthMiddleware, tenant_of
from blink.gateway.documents import DocumentRoutes
from blink.gateway.keys import Tenant
from blink.gateway.limits import ConnectionCap
from blink.gateway.openai_http import OpenAIRoutes
from blink.gateway.openapi import openapi_endpoint
from blink.gateway.realtime.session import realtime_endpoint
from blink.gateway.service import Gateway
from blink.gateway.wire import error_response
from blink.semantic_cache.cache import SemanticCache
from blink.telemetry.metrics import CONTENT_TYPE

log = logging.getLogger("blink.gateway")

# Starlette's own errors (routing), in blink's error shape; any other is a 400
_HTTP_ERRORS: dict[int, type[BlinkError]] = {404: NotFound, 405: MethodNotAllowed}

# what a page allowed by --cors-origins may send, and read of the answers
CORS_METHODS = ("GET", "POST", "DELETE")
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "traceparent")
CORS_EXPOSED_HEADERS = (
    *(f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset") for unit in ("requests", "tokens")),
    "Retry-After",
    "X-Blink-Cache",
)


def middleware(config: GatewayConfig, gateway: Gateway) -> list[Middleware]:
    """The app's middleware, outermost first, all pure ASGI (they sit on the streaming path). ValueError names a
    flag whose value they cannot take.

    The connection cap first (cheapest), then Host (a rebound name is refused before anything else runs), then
    CORS (its preflights carry no credentials, so it stays outside anything that checks them), then the WebSocket
    Origin check, then the API key."""
    stack = [
        Middleware(ConnectionCap, limit=config.max_connections),
        Middleware(TrustedHostMiddleware, allowed_hosts=browser.trusted_hosts(config), www_redirect=False),
    ]
    cors = browser.cors_origins(config)
    if cors:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cors,
                allow_methods=CORS_METHODS,
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_EXPOSED_HEADERS,
            )
        )
    stack.append(Middleware(browser.OriginCheck, allowed=browser.allowed_origins(config)))
    stack.append(Middleware(AuthMiddleware, auth=gateway.auth))
    return stack


def _cache_tenants(gateway: Gateway, caller: Tenant, params: Mapping[str, str]) -> list[str]:
    """Whose cache a DELETE /v1/cache drops: the caller's own, or (admin keys only) a named tenant's or all."""
    named, every = params.get("tenant"), params.get("all_tenants", "false").lower()
    if every not in ("true", "false"):
        raise InvalidRequest("'all_tenants' must be true or false", param="all_tenants")
    if named is None and every == "false":
        return [caller.name]
    if not caller.admin:
        raise PermissionDenied("only an admin key may drop another tenant's cache", param="tenant")
    return gateway.auth.tenants() if every == "true" else [named or caller.name]


def create_app(
    gateway: Gateway, lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None
) -> Starlette:
    """Build the app around `gateway`. `lifespan` starts and stops what the gateway talks to (bus, replicas).
    ValueError: a browser-facing flag (--allowed-hosts, --allowed-origins, --cors-origins) holds a value that is
    not one."""
    routes_api = OpenAIRoutes(gateway)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        replicas = [
            {
                "id": r.replica_id,
                "model": r.model,
                "state": r.state.value,
                "running": r.running,
                "waiting": r.waiting,
                "queue_wait_s": r.queue_wait_s,
                "kv_blocks_in_use": r.kv_blocks_in_use,
                "kv_blocks_total": r.kv_blocks_total,
                "background_prefill_tokens": r.background_prefill_tokens,
                "background_tokens_used": r.background_tokens_used,
                "interrupted_steps": r.interrupted_steps,
                "speculative": {"mode": r.speculative, "proposed": r.spec_proposed, "accepted": r.spec_accepted},
                "heartbeat_at": r.sent,
            }
            for r in gateway.bus.replicas()
        ]
        cache_ready = gateway.cache is None or gateway.cache.ready  # its embedder loads beside the model
        ready = bool(gateway.ready_replicas()) and cache_ready and not gateway.shutting_down
        body: dict[str, Any] = {
            "status": "ready" if ready else "not_ready",
            "replicas": replicas,
            "active_responses": gateway.num_active,
            "semantic_cache": gateway.cache.snapshot() if gateway.cache is not None else None,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)

    async def invalidate_cache(request: Request) -> Response:
        """DELETE /v1/cache[?model=M]: drop the caller's tenant's cached answers (of one model if named). An admin
        key may name another tenant (`tenant=NAME`) or all of them (`all_tenants=true`)."""
        tenants = _cache_tenants(gateway, tenant_of(request.scope), request.query_params)
        if gateway.cache is None:
            raise InvalidRequest("this server's semantic cache is disabled")
        model = request.query_params.get("model")
        if model is not None:
            gateway.check_model(model)
        deleted = 0
        for tenant in tenants:
            deleted += await _invalidate(gateway.cache, tenant, model)
        return JSONResponse({"object": "cache.invalidated", "model": model, "deleted": deleted})

    async def on_blink_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BlinkError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(_HTTP_ERRORS.get(exc.status_code, InvalidRequest)(exc.detail))

    documents: list[Route] = []
    if gateway.store is not None:
        docs = DocumentRoutes(gateway.store, gateway.config.max_request_bytes + (64 << 10))  # a document + its JSON
        documents = [
            Route("/v1/documents", docs.create, methods=["POST"]),
            Route("/v1/documents", docs.list_documents, methods=["GET"]),
            Route("/v1/documents/{id}", docs.retrieve, methods=["GET"]),
            Route("/v1/documents/{id}", docs.delete, methods=["DELETE"]),
        ]
    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi_endpoint),
            Route("/v1/models", routes_api.models),
            Route("/v1/chat/completions", routes_api.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes_api.completions, methods=["POST"]),
            WebSocketRoute("/v1/realtime", realtime_endpoint),
            Route("/v1/cache", invalidate_cache, methods=["DELETE"]),
            *documents,
        ],
        exception_handlers={BlinkError: on_blink_error, HTTPException: on_http_error},
        middleware=middleware(gateway.config, gateway),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


async def _invalidate(cache: SemanticCache, tenant: str, model: str | None) -> int:
    try:
        return await cache.invalidate(tenant, model)
    except CacheUnavailable as exc:  # its message names the Redis: for the log, not for a client
        log.warning("semantic cache: invalidating failed: %s", exc)
        raise CacheUnavailable("the semantic cache is unavailable; retry shortly") from exc
