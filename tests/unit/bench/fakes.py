"""A scripted /v1/realtime server on a real local socket (no model): the drivers' and the runner's tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


@contextlib.asynccontextmanager
async def realtime(mode: str, received: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A scripted /v1/realtime: 6 deltas 10 ms apart, honouring response.cancel; mode "refuse" refuses
    response.create, mode "fail" ends the response as failed."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "session.created", "session": {"id": "s"}}))
        async for raw in ws:
            event = json.loads(raw)
            received.append(event)
            kind = event["type"]
            if kind == "session.update":
                await ws.send(json.dumps({"type": "session.updated", "session": event["session"]}))
            elif kind == "conversation.item.create":
                await ws.send(json.dumps({"type": "conversation.item.done", "item": event["item"]}))
            elif kind == "response.create" and mode == "refuse":
                error = {"code": "overloaded", "message": "busy", "event_id": event["event_id"]}
                await ws.send(json.dumps({"type": "error", "error": error}))
            elif kind == "response.create":
                await respond(ws, mode, received)

    def models(conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/v1/models":  # what a driver's prepare() asks
            return conn.respond(200, '{"object": "list", "data": []}')
        return None

    async with serve(handler, "127.0.0.1", 0, process_request=models) as server:
        port = server.sockets[0].getsockname()[1]  # type: ignore[index]
        yield f"http://127.0.0.1:{port}"


async def respond(ws: ServerConnection, mode: str, received: list[dict[str, Any]]) -> None:
    await ws.send(json.dumps({"type": "response.created", "response": {"id": "r", "status": "in_progress"}}))
    status, n = "completed", 0
    for n in range(1, 7):  # noqa: B007
        await ws.send(json.dumps({"type": "response.output_text.delta", "response_id": "r", "delta": "x"}))
        with contextlib.suppress(TimeoutError):
            event = json.loads(await asyncio.wait_for(ws.recv(), 0.01))
            received.append(event)
            if event["type"] == "response.cancel":
                status = "cancelled"
                break
    details: dict[str, Any] = {}
    if mode == "fail":
        status, details = "failed", {"error": {"code": "engine_failure"}}
    usage = {"input_tokens": 30, "output_tokens": n, "input_token_details": {"cached_tokens": 16}}
    response = {"id": "r", "status": status, "status_details": details, "usage": usage}
    await ws.send(json.dumps({"type": "response.done", "response": response}))


@contextlib.contextmanager
def realtime_in_thread(mode: str = "ok") -> Iterator[str]:
    """`realtime` on its own event loop in a thread, for code that runs asyncio.run itself (the CLI)."""
    loop = asyncio.new_event_loop()
    ready, urls = threading.Event(), []
    stop = asyncio.Event()

    async def main() -> None:
        async with realtime(mode, []) as url:
            urls.append(url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the scripted server did not start"
        yield urls[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
