"""Authentication at the door: a pure ASGI middleware (no BaseHTTPMiddleware: it would break contextvars, and so
OpenTelemetry's context, on the streaming path).

Every HTTP request and WebSocket handshake under /v1/ is authenticated before any route runs: the key comes from
`Authorization: Bearer <key>`, or for a WebSocket from the subprotocol `openai-insecure-api-key.<key>` (browsers
cannot set headers on one). A missing or unknown key gets 401 invalid_api_key: an HTTP response, or for a
WebSocket the handshake's own HTTP response (the ASGI denial-response extension), so no socket is ever opened for
it. The tenant then rides in the ASGI scope (`tenant_of(scope)`). Paths outside /v1/ (health, readiness, metrics,
the OpenAPI description) stay open and expose no tenant's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from blink.errors import AuthenticationError
from blink.gateway.keys import Authenticator, Tenant
from blink.gateway.wire import error_response, ws_api_key

SCOPE_KEY = "blink.tenant"
PROTECTED = "/v1/"


def tenant_of(scope: Mapping[str, Any]) -> Tenant:
    """The tenant the middleware authenticated for this request (a route outside /v1/ has none: a bug)."""
    tenant = scope.get(SCOPE_KEY)
    assert isinstance(tenant, Tenant), "tenant_of() on a request the auth middleware did not see"
    return tenant


class AuthMiddleware:
    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        key, _ = ws_api_key(Headers(scope=scope), list(scope.get("subprotocols") or []))
        try:
            tenant = self.auth.authenticate(key)
        except AuthenticationError as exc:
            if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1008, "reason": exc.message})  # no denial response
                return
            response = error_response(exc)
            response.headers["WWW-Authenticate"] = 'Bearer realm="blink"'
            await response(scope, receive, send)  # on a WebSocket: the handshake's HTTP response
            return
        await self.app({**scope, SCOPE_KEY: tenant}, receive, send)
