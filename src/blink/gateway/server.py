"""The HTTP server around the gateway's app: uvicorn, configured from the gateway's config, draining the gateway's
streams before uvicorn closes their sockets."""

from __future__ import annotations

from typing import Any

import uvicorn

from blink.gateway.service import Gateway

WS_MAX_SIZE_FACTOR = 4  # uvicorn refuses a WebSocket message over this many times --max-request-bytes


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


class _Server(uvicorn.Server):
    """uvicorn closes WebSockets (1012) as soon as its shutdown starts; drain our streams before that, so each
    in-flight response first ends with response.done (status incomplete)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: Any = None) -> None:
        await self._gateway.shutdown()
        await super().shutdown(sockets)
