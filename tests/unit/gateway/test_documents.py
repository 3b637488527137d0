"""The documents API on a small app holding just its routes, over an in-memory store with a hashing embedder."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from blink.config import TenantLimits
from blink.errors import BlinkError
from blink.gateway.app import DOCUMENT_ROUTES
from blink.gateway.auth import AuthMiddleware
from blink.gateway.documents import JSON_ROOM
from blink.gateway.keys import Tenant
from blink.gateway.wire import error_response
from blink.preload.store import MemoryContextStore, TenantStores, chunk_text
from tests.unit.preload.fakes import HashEmbedder

TEXT = "Cats purr when they are content.\n\nKittens play with yarn."
MAX_REQUEST_BYTES = 2000


class ThreeDocuments:
    """Every caller is one tenant who may keep 3 documents."""

    keyed = False

    def authenticate(self, key: str | None) -> Tenant:
        return Tenant("t", TenantLimits(max_documents=3))

    def tenants(self) -> list[str]:
        return ["t"]


def make_client(store: MemoryContextStore) -> TestClient:
    """The routes exactly as app.py mounts them, and app.py's translation of blink errors."""

    async def on_blink_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BlinkError)
        return error_response(exc)

    app = Starlette(
        routes=DOCUMENT_ROUTES,
        exception_handlers={BlinkError: on_blink_error},
        middleware=[Middleware(AuthMiddleware, auth=ThreeDocuments())],
    )
    # what the endpoints read of the gateway: its document store and --max-request-bytes
    config = SimpleNamespace(max_request_bytes=MAX_REQUEST_BYTES)
    app.state.gateway = SimpleNamespace(store=TenantStores(lambda: store), config=config)
    return TestClient(app)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client(MemoryContextStore(HashEmbedder(), max_document_bytes=1000)) as c:
        yield c


def assert_error(response: Any, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")


def test_create_retrieve_list_delete(client: TestClient) -> None:
    metadata = {"source": "wiki", "page": 3, "score": 0.5, "draft": False}
    created = client.post("/v1/documents", json={"id": "a.b_c:d-1", "text": TEXT, "metadata": metadata})
    assert created.status_code == 201
    body = created.json()
    assert body == {
        "id": "a.b_c:d-1",
        "object": "document",
        "chunks": len(chunk_text("x", TEXT)),
        "bytes": len(TEXT.encode()),
        "metadata": metadata,
        "created": body["created"],
    }
    assert body["chunks"] == 2 and isinstance(body["created"], int)
    assert client.get("/v1/documents/a.b_c:d-1").json() == {**body, "text": TEXT}
    assert client.get("/v1/documents").json() == {"object": "list", "data": [body]}

    deleted = client.delete("/v1/documents/a.b_c:d-1")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": "a.b_c:d-1", "object": "document.deleted", "deleted": True}
    assert_error(client.get("/v1/documents/a.b_c:d-1"), 404, "not_found", "id")
    assert_error(client.delete("/v1/documents/a.b_c:d-1"), 404, "not_found", "id")
    assert client.get("/v1/documents").json()["data"] == []


def test_a_document_without_an_id_gets_one(client: TestClient) -> None:
    first = client.post("/v1/documents", json={"text": TEXT}).json()
    second = client.post("/v1/documents", json={"text": TEXT}).json()
    assert re.fullmatch(r"doc-[0-9a-f]+", first["id"])
    assert first["id"] != second["id"] and first["metadata"] == {}
    assert client.get(f"/v1/documents/{first['id']}").json()["text"] == TEXT


def test_posting_an_existing_id_replaces_the_document(client: TestClient) -> None:
    client.post("/v1/documents", json={"id": "d", "text": TEXT, "metadata": {"v": 1}})
    client.post("/v1/documents", json={"id": "d", "text": "New text.", "metadata": {"v": 2}})
    [listed] = client.get("/v1/documents").json()["data"]
    assert (listed["id"], listed["chunks"], listed["metadata"]) == ("d", 1, {"v": 2})
    assert client.get("/v1/documents/d").json()["text"] == "New text."


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b'["a list"]', "invalid_json", None),
        (b'{"id": "x"}', "invalid_request", "text"),
        (b'{"text": 3}', "invalid_request", "text"),
        (b'{"text": ""}', "invalid_request", "text"),
        (b'{"text": " \\n\\n "}', "invalid_request", "text"),
        (b'{"id": "", "text": "t"}', "invalid_request", "id"),
        (b'{"id": "has space", "text": "t"}', "invalid_request", "id"),
        (b'{"id": "a/b", "text": "t"}', "invalid_request", "id"),
        (b'{"id": "' + b"x" * 129 + b'", "text": "t"}', "invalid_request", "id"),
        (b'{"id": 5, "text": "t"}', "invalid_request", "id"),
        (b'{"text": "t", "metadata": ["a"]}', "invalid_request", "metadata"),
        (b'{"text": "t", "metadata": {"a": {"b": 1}}}', "invalid_request", "metadata.a"),
        (b'{"text": "t", "metadata": {"a": null}}', "invalid_request", "metadata.a"),
        (b'{"text": "t", "metadata": {"a": NaN}}', "invalid_request", "metadata.a"),
    ],
)
def test_a_malformed_document_is_400_and_stores_nothing(
    client: TestClient, body: bytes, code: str, param: str | None
) -> None:
    response = client.post("/v1/documents", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, code, param)
    assert client.get("/v1/documents").json()["data"] == []


def test_an_id_at_the_length_limit_is_accepted(client: TestClient) -> None:
    assert client.post("/v1/documents", json={"id": "x" * 128, "text": "t"}).status_code == 201


def test_an_oversized_body_or_document_is_413(client: TestClient) -> None:
    too_big_body = client.post("/v1/documents", json={"text": "word " * ((MAX_REQUEST_BYTES + JSON_ROOM) // 5)})
    assert_error(too_big_body, 413, "request_too_large", None)
    too_big_text = client.post("/v1/documents", json={"text": "word " * 250})  # 1250 bytes: the body fits
    assert_error(too_big_text, 413, "request_too_large", "text")
    assert client.get("/v1/documents").json()["data"] == []


def test_a_full_store_is_400_until_a_document_is_deleted(client: TestClient) -> None:
    for i in range(3):
        assert client.post("/v1/documents", json={"id": f"d{i}", "text": TEXT}).status_code == 201
    assert_error(client.post("/v1/documents", json={"id": "d3", "text": TEXT}), 400, "invalid_request", None)
    assert client.post("/v1/documents", json={"id": "d0", "text": "Replaced."}).status_code == 201
    client.delete("/v1/documents/d1")
    assert client.post("/v1/documents", json={"id": "d3", "text": TEXT}).status_code == 201


def test_the_documents_api_and_its_store_do_not_import_torch() -> None:
    code = "import sys, blink.gateway.documents, blink.preload.store; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_include_chunks_lists_the_chunks_text_in_order(client: TestClient) -> None:
    client.post("/v1/documents", json={"id": "cats", "text": TEXT})
    body = client.get("/v1/documents/cats", params={"include": "chunks"}).json()
    assert body["chunk_texts"] == [c.text for c in chunk_text("cats", TEXT)] and len(body["chunk_texts"]) == 2
    assert "chunk_texts" not in client.get("/v1/documents/cats").json()
    assert_error(client.get("/v1/documents/cats", params={"include": "vectors"}), 400, "invalid_request", "include")
