"""The ASGI application: routes, error translation, health and readiness.

Only pure ASGI pieces sit on the streaming path (no BaseHTTPMiddleware).
"""

from __future__ import annotations

from collections.abc import Callable
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
from blink.errors import BlinkError, InvalidRequest, MethodNotAllowed, NotFound
from blink.gateway import browser
from blink.gateway.documents import DocumentRoutes
from blink.gateway.openai_http import OpenAIRoutes
from blink.gateway.openapi import openapi_endpoint
from blink.gateway.realtime import realtime_endpoint
from blink.gateway.service import Gateway
from blink.gateway.wire import api_key, error_response
from blink.telemetry.metrics import CONTENT_TYPE

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


def middleware(config: GatewayConfig) -> list[Middleware]:
    """The app's middleware, outermost first, all pure ASGI (they sit on the streaming path). ValueError names a
    flag whose value they cannot take.

    Host first (a rebound name is refused before anything else runs), then CORS (its preflights carry no
    credentials, so it stays outside anything that checks them), then the WebSocket Origin check."""
    stack = [Middleware(TrustedHostMiddleware, allowed_hosts=browser.trusted_hosts(config), www_redirect=False)]
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
    return stack


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
        """DELETE /v1/cache[?model=M]: drop the caller's tenant's cached answers (of one model if named)."""
        if gateway.cache is None:
            raise InvalidRequest("this server's semantic cache is disabled")
        model = request.query_params.get("model")
        if model is not None:
            gateway.check_model(model)
        deleted = await gateway.cache.invalidate(api_key(request.headers), model)
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
        middleware=middleware(gateway.config),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
