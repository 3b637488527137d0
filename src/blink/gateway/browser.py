"""Defences for a server that web pages can reach: which pages may open WebSockets (Origin), which names the
server answers to (Host), and which pages may call the HTTP API from scripts (CORS).

A page on any site can open a WebSocket to 127.0.0.1 (browsers apply no same-origin policy to WebSockets, only
send its Origin) and can make the browser send a request to a name that the attacker's DNS points at 127.0.0.1
(DNS rebinding: then the Host header is the attacker's name). So a handshake with an Origin header must come from
an allowed page, and every request must name an allowed Host. Clients that are not browsers send no Origin.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from blink.config import GatewayConfig
from blink.errors import OriginNotAllowed
from blink.gateway.wire import error_response

log = logging.getLogger("blink.gateway.browser")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WILDCARD_BINDS = ("", "0.0.0.0", "::")


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated flag's items, stripped, empty ones dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]`, lowercased, without the scheme's default port; None for anything that is not an
    http(s) origin (`null`, a file page, a path, a bad port)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    tail = "" if port is None or port == _DEFAULT_PORTS[parts.scheme] else f":{port}"
    return f"{parts.scheme}://{_bracket(parts.hostname)}{tail}"


def parse_origins(value: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of origins, normalized ('*' kept); ValueError names an entry that is not one."""
    out = []
    for item in split_list(value):
        origin = "*" if item == "*" else normalize_origin(item)
        if origin is None:
            raise ValueError(f"{flag}: {item!r} is not an origin (scheme://host[:port])")
        out.append(origin)
    return tuple(out)


def allowed_origins(config: GatewayConfig) -> tuple[str, ...]:
    return parse_origins(config.allowed_origins, "--allowed-origins")


def cors_origins(config: GatewayConfig) -> tuple[str, ...]:
    return parse_origins(config.cors_origins, "--cors-origins")


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake from a page of `origin` (its Origin header) to the server named `host` (its
    Host header) is accepted: the server's own pages always; then any page for '*', the pages of `allowed` if
    any, else pages served from a loopback address (any port)."""
    if "*" in allowed:
        return True
    normalized = normalize_origin(origin)
    if normalized is None:
        return False
    scheme, _, netloc = normalized.partition("://")
    if host is not None and host.strip().lower() in (netloc, f"{netloc}:{_DEFAULT_PORTS[scheme]}"):
        return True
    if allowed:
        return normalized in allowed
    return urlsplit(normalized).hostname in LOOPBACK_NAMES


def trusted_hosts(config: GatewayConfig) -> list[str]:
    """The Host names accepted (for TrustedHostMiddleware): the loopback names, the address --host binds (unless
    it is every address) and --allowed-hosts. ValueError names a pattern the middleware would not take."""
    hosts = [_bracket(name) for name in LOOPBACK_NAMES]
    if config.host not in _WILDCARD_BINDS:
        hosts.append(_bracket(config.host.lower()))
    for item in split_list(config.allowed_hosts):
        if "*" in item[1:] or (item.startswith("*") and item != "*" and not item.startswith("*.")):
            raise ValueError(f"--allowed-hosts: {item!r}: a wildcard is '*' alone or a prefix, as '*.example.com'")
        hosts.append(_bracket(item.lower()))
    return list(dict.fromkeys(hosts))


def wildcard_bind_warning(config: GatewayConfig) -> str | None:
    """What an operator should know when --host binds every address but --allowed-hosts names no Host: clients
    that name this machine by its address or DNS name get 400."""
    if config.host in _WILDCARD_BINDS and not config.allowed_hosts:
        return (
            f"--host {config.host!r} listens on every address, but only the Host names {LOOPBACK_NAMES} are "
            "accepted: name the others with --allowed-hosts (a defence against DNS rebinding)"
        )
    return None


class OriginCheck:
    """Pure ASGI middleware: a WebSocket handshake whose Origin is not allowed (`origin_allowed`) is refused with
    HTTP 403 and an OpenAI-style error body (where the server supports the denial-response extension, as
    uvicorn does; else the handshake is closed, which servers also send as 403), logged once at info. HTTP and
    handshakes without an Origin pass."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            headers = Headers(scope=scope)
            origin, host = headers.get("origin"), headers.get("host")
            if origin is not None and not origin_allowed(origin, host, self.allowed):
                log.info("refused a WebSocket from origin %r (Host %r): not an allowed origin", origin, host)
                await _deny(WebSocket(scope, receive, send), origin)
                return
        await self.app(scope, receive, send)


async def _deny(ws: WebSocket, origin: str) -> None:
    error = OriginNotAllowed(
        f"WebSocket connections from web pages of {origin!r} are not allowed (the server's --allowed-origins)",
        param="Origin",
    )
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(error))
    else:
        await ws.close(1008)
