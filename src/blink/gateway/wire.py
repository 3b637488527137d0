"""Where errors become HTTP responses and WebSocket events (the one translation point), and SSE framing."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from blink.errors import BlinkError


def error_body(exc: BlinkError) -> dict[str, Any]:
    return {"error": exc.to_dict()}


def error_response(exc: BlinkError) -> JSONResponse:
    retry = "1" if exc.retry_after is None else str(max(1, math.ceil(exc.retry_after)))
    headers = {"Retry-After": retry} if exc.status in (429, 503) else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def error_event(exc: BlinkError, event_id: str | None = None) -> dict[str, Any]:
    error = exc.to_dict()
    if event_id is not None:
        error["event_id"] = event_id
    return {"type": "error", "error": error}


def api_key(headers: Mapping[str, str]) -> str | None:
    """The API key of `Authorization: Bearer <key>` (HTTP, and the WebSocket handshake); None without one. Until
    full authentication exists, the key names the tenant (the semantic cache's hard partition); it is not checked."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


KEY_SUBPROTOCOL = "openai-insecure-api-key."  # browsers cannot set headers on a WebSocket: the key rides here


def ws_api_key(headers: Mapping[str, str], subprotocols: list[str]) -> tuple[str | None, str | None]:
    """(API key, subprotocol to accept) of a WebSocket handshake: the Authorization header's key, else one offered
    as the subprotocol `openai-insecure-api-key.<key>` (as OpenAI's Realtime API takes it from browsers). The
    accepted subprotocol is `realtime` when offered (the key's own is never echoed back), else none."""
    key = api_key(headers)
    if key is None:
        key = next((p.removeprefix(KEY_SUBPROTOCOL) for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)), None)
    return key or None, "realtime" if "realtime" in subprotocols else None


def sse(data: dict[str, Any] | str, event_id: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}data: {payload}\n\n".encode()
