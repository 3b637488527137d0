"""Browser-facing defences and bad input, through a real `blink serve`: WebSocket Origin checks (cross-site
WebSocket hijacking), Host checks (DNS rebinding), CORS, JSON-only bodies, deeply nested JSON, /openapi.json."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest
import schemathesis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.e2e.conftest import Server, serving

pytestmark = pytest.mark.slow

DEEP = b"[" * 100_000


def handshake(server: Server, headers: dict[str, str]) -> tuple[int, bytes]:
    """A WebSocket opening handshake sent byte for byte (so Host and Origin are exactly what the test says):
    the response's status and what followed the status line."""
    lines = [
        "GET /v1/realtime HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or (not data.startswith(b"HTTP/1.1 101") and not _complete(data)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length")), 0)
    return len(body) >= length


def new_log(server: Server, since: int) -> str:
    server.log()  # flushes
    return server.log_path.read_bytes()[since:].decode(errors="replace")


def test_websocket_from_another_site_is_refused_with_403(server: Server) -> None:
    since = server.log_path.stat().st_size
    status, data = handshake(server, {"Host": f"127.0.0.1:{server.port}", "Origin": "http://evil.example"})
    assert status == 403
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "origin_not_allowed"

    async def main() -> None:  # a real client, as a browser page on that site would connect
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.ws_url, origin="http://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403

    asyncio.run(main())
    log = new_log(server, since)
    assert "Traceback" not in log and "evil.example" in log


@pytest.mark.parametrize(
    "origin", [None, "same", "http://localhost:5173", "http://127.0.0.1:3000", "https://[::1]:8443"]
)
def test_websocket_from_this_server_loopback_pages_or_no_browser_is_accepted(
    server: Server, origin: str | None
) -> None:
    origin = f"http://127.0.0.1:{server.port}" if origin == "same" else origin

    async def main() -> None:
        async with connect(server.ws_url, origin=origin) as ws:  # type: ignore[arg-type]
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "session.created"

    asyncio.run(main())


def test_a_foreign_host_header_is_refused_on_http_and_websocket(server: Server) -> None:
    # DNS rebinding: evil.example resolving to 127.0.0.1 sends its own name as Host
    r = httpx.get(f"{server.base}/v1/models", headers={"Host": "evil.example"})
    assert r.status_code == 400
    status, _ = handshake(server, {"Host": f"evil.example:{server.port}"})
    assert status == 400
    assert httpx.get(f"{server.base}/v1/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_a_body_that_is_not_json_gets_415(server: Server) -> None:
    body = json.dumps({"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 1})
    r = httpx.post(f"{server.base}/v1/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_deeply_nested_json_is_a_400_and_an_error_event_with_no_traceback(server: Server) -> None:
    since = server.log_path.stat().st_size
    r = httpx.post(f"{server.base}/v1/chat/completions", content=DEEP, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

    async def main() -> None:
        async with connect(server.ws_url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(DEEP.decode())
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert event["type"] == "error" and event["error"]["code"] == "invalid_json"

    asyncio.run(main())
    assert "Traceback" not in new_log(server, since)


def test_openapi_description_loads_in_schemathesis(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /readyz"} <= labels


def test_configured_origins_hosts_and_cors(tmp_path: Path) -> None:
    flags = ("--allowed-origins", "https://app.example", "--allowed-hosts", "api.example")
    with serving(tmp_path / "serve.log", *flags, "--cors-origins", "https://app.example") as srv:
        host = {"Host": f"api.example:{srv.port}"}
        assert handshake(srv, {**host, "Origin": "https://app.example"})[0] == 101
        assert handshake(srv, {**host, "Origin": "http://localhost:5173"})[0] == 403  # the list replaces loopback
        assert httpx.get(f"{srv.base}/v1/models", headers=host).status_code == 200
        assert httpx.get(f"{srv.base}/v1/models", headers={"Host": "other.example"}).status_code == 400
        preflight = httpx.options(
            f"{srv.base}/v1/chat/completions",
            headers={
                **host,
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        simple = httpx.get(f"{srv.base}/v1/models", headers={**host, "Origin": "https://app.example"})
        assert "x-blink-cache" in simple.headers["access-control-expose-headers"].lower()
        assert "Traceback" not in srv.log()
