"""The ASGI application: routes, error translation, health and readiness.

Only pure ASGI pieces sit on the streaming path (no BaseHTTPMiddleware).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager

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
from blink.gateway import browser, documents, openai_http, web
from blink.gateway.auth import AuthMiddleware, tenant_of
from blink.gateway.keys import Tenant
from blink.gateway.limits import ConnectionCap
from blink.gateway.link import link_endpoint
from blink.gateway.openapi import openapi_endpoint
from blink.gateway.realtime.session import realtime_endpoint
from blink.gateway.service import Gateway, gateway_of
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
    "X-Blink-Route",
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


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    ready, body = gateway_of(request).readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(gateway_of(request).metrics.exposition(), media_type=CONTENT_TYPE)


async def invalidate_cache(request: Request) -> Response:
    """DELETE /v1/cache[?model=M]: drop the caller's tenant's cached answers (of one model if named). An admin
    key may name another tenant (`tenant=NAME`) or all of them (`all_tenants=true`)."""
    gateway = gateway_of(request)
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


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/openapi.json", openapi_endpoint),
    Route("/v1/models", openai_http.models),
    Route("/v1/chat/completions", openai_http.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_http.completions, methods=["POST"]),
    WebSocketRoute("/v1/realtime", realtime_endpoint),
    WebSocketRoute("/v1/link", link_endpoint),  # an edge's link (blink edge --core URL)
    Route("/v1/cache", invalidate_cache, methods=["DELETE"]),
    *web.ROUTES,  # the browser client at / (src/blink/web/)
]
DOCUMENT_ROUTES = [  # on a server with a document store
    Route("/v1/documents", documents.create_document, methods=["POST"]),
    Route("/v1/documents", documents.list_documents, methods=["GET"]),
    Route("/v1/documents/{id}", documents.retrieve_document, methods=["GET"]),
    Route("/v1/documents/{id}", documents.delete_document, methods=["DELETE"]),
]


def create_app(
    gateway: Gateway, lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None
) -> Starlette:
    """Build the app around `gateway` (its endpoints find it in `app.state`). `lifespan` starts and stops what
    the gateway talks to (bus, replicas). ValueError: a browser-facing flag (--allowed-hosts, --allowed-origins,
    --cors-origins) holds a value that is not one."""
    app = Starlette(
        routes=[*ROUTES, *(DOCUMENT_ROUTES if gateway.store is not None else [])],
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
