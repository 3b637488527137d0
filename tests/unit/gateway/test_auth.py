"""API keys at the door: a live gateway with a keys file, real HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from blink.gateway.keys import KeyFile
from tests.unit.gateway.conftest import MODEL, LiveServer, bearer, make_keys

Serve = Callable[..., LiveServer]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def keyed(serve: Serve, tmp_path: Path) -> tuple[LiveServer, dict[str, str], Path]:
    path = tmp_path / "keys.json"
    keys = make_keys(path, "acme", "globex")
    return serve(api_keys=str(path)), keys, path


def test_http_needs_a_known_key_and_health_stays_open(keyed: tuple[LiveServer, dict[str, str], Path]) -> None:
    server, keys, _ = keyed
    url = f"{server.base}/v1/chat/completions"
    key = keys["acme"]
    wrong = key[:-1] + ("1" if key.endswith("0") else "0")  # one hex digit off
    for headers in ({}, bearer("junk"), bearer(wrong), {"Authorization": key}):
        reply = httpx.post(url, json=CHAT, headers=headers, timeout=10)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{server.base}/v1/models", timeout=10).status_code == 401
    assert httpx.post(url, json=CHAT, headers=bearer(keys["acme"]), timeout=10).status_code == 200
    for path in ("/healthz", "/metrics"):
        assert httpx.get(server.base + path, timeout=10).status_code == 200
    assert server.errors == []


def test_a_websocket_without_a_known_key_is_refused_at_the_handshake(
    keyed: tuple[LiveServer, dict[str, str], Path],
) -> None:
    server, keys, _ = keyed

    async def main() -> None:
        for kwargs in ({}, {"additional_headers": bearer("junk")}, {"subprotocols": ["openai-insecure-api-key.x"]}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws_url, **kwargs):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == 401
            assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "invalid_api_key"
        offered = ["realtime", f"openai-insecure-api-key.{keys['globex']}"]  # as a browser sends it
        async with connect(server.ws_url, subprotocols=offered) as ws:  # type: ignore[list-item]
            assert json.loads(await ws.recv())["type"] == "session.created"
            assert ws.subprotocol == "realtime"

    asyncio.run(main())
    assert server.errors == []


def test_keys_added_or_revoked_take_effect_without_a_restart(keyed: tuple[LiveServer, dict[str, str], Path]) -> None:
    server, keys, path = keyed
    url = f"{server.base}/v1/models"
    assert httpx.get(url, headers=bearer(keys["acme"]), timeout=10).status_code == 200
    file = KeyFile(path)
    key_id, new = file.add("initech")
    assert httpx.get(url, headers=bearer(new), timeout=10).status_code == 200
    assert file.revoke(key_id)
    assert httpx.get(url, headers=bearer(new), timeout=10).status_code == 401
    path.write_text("{not json")  # a broken file keeps the last good keys in force
    assert httpx.get(url, headers=bearer(keys["acme"]), timeout=10).status_code == 200


def test_documents_of_one_tenant_are_invisible_to_another(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = make_keys(path, "a", "b")
    server = serve(api_keys=str(path), documents=True)
    docs = f"{server.base}/v1/documents"
    a, b = bearer(keys["a"]), bearer(keys["b"])
    body = {"id": "plans", "text": "The launch is on Tuesday. The code name is Falcon."}
    assert httpx.post(docs, json=body, headers=a, timeout=10).status_code == 201
    assert httpx.get(docs, headers=b, timeout=10).json()["data"] == []
    assert httpx.get(f"{docs}/plans", headers=b, timeout=10).status_code == 404
    assert httpx.delete(f"{docs}/plans", headers=b, timeout=10).status_code == 404
    # b may use the same id for a document of its own; a's stays as it was
    assert httpx.post(docs, json={"id": "plans", "text": "Nothing here."}, headers=b, timeout=10).status_code == 201
    assert "Falcon" in httpx.get(f"{docs}/plans", headers=a, timeout=10).json()["text"]

    async def open_as(headers: dict[str, str]) -> str:
        """The error code context.open gets (a success is silent: the next event's error answers a probe)."""
        async with connect(server.ws_url, additional_headers=headers) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "context.open", "document_ids": ["plans", "a-only"]}))
            await ws.send(json.dumps({"type": "probe"}))
            return str(json.loads(await asyncio.wait_for(ws.recv(), 10))["error"]["code"])

    httpx.post(docs, json={"id": "a-only", "text": "Only a has this."}, headers=a, timeout=10)
    assert asyncio.run(open_as(b)) == "not_found"  # b has no document a-only
    assert asyncio.run(open_as(a)) == "unknown_event_type"  # the probe's: a's context.open succeeded
    store_a, store_b = server.gateway.store.of("a"), server.gateway.store.of("b")  # type: ignore[union-attr]
    found = asyncio.run(store_b.search("launch code name", 5))
    assert all("Falcon" not in s.chunk.text for s in found)
    assert any("Falcon" in s.chunk.text for s in asyncio.run(store_a.search("launch code name", 5)))
    assert server.errors == []


def test_only_an_admin_key_drops_another_tenants_cache(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = make_keys(path, "a")
    admin = KeyFile(path).add("ops", admin=True)[1]
    server = serve(api_keys=str(path))
    url = f"{server.base}/v1/cache"
    for params in ({"all_tenants": "true"}, {"tenant": "ops"}):
        reply = httpx.delete(url, params=params, headers=bearer(keys["a"]), timeout=10)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "permission_denied"
        # the admin passes the permission check (this server has no semantic cache: that is the 400)
        reply = httpx.delete(url, params=params, headers=bearer(admin), timeout=10)
        assert reply.status_code == 400 and "disabled" in reply.json()["error"]["message"]
