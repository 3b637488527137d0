"""The browser client (src/blink/web/): its page at `/` and its files under `/web/`, with headers that keep the
page to this server's own scripts, styles and connections (its Content-Security-Policy), so a script injected
into an answer or a document could neither run nor send anything elsewhere. The page shows no tenant's data by
itself: it reaches the API under /v1/ with the key the user types, like any other client.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
HEADERS = {
    # 'self' in connect-src covers ws:// and wss:// to this origin (CSP Level 3)
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: an upgraded server's page is never stale
}


class WithHeaders:
    """Adds HEADERS to every HTTP response of `app` (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.raw = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.raw]}
            await send(message)

        await self.app(scope, receive, sending)


async def page(request: Request) -> Response:
    return FileResponse(WEB_DIR / "index.html", headers=HEADERS)


ROUTES = [
    Route("/", page, methods=["GET", "HEAD"]),
    Mount("/web", app=WithHeaders(StaticFiles(directory=WEB_DIR)), name="web"),
]
