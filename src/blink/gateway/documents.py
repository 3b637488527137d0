"""The documents API: POST/GET /v1/documents, GET/DELETE /v1/documents/{id}, over the caller's tenant's
ContextStore (another tenant's documents are not there: not listed, read, replaced, deleted or retrieved).

Documents put here are what a realtime session opens with `context.open {document_ids}`. Errors are raised as
BlinkErrors and become HTTP responses at the app's one translation point.
"""

from __future__ import annotations

import math
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from blink.errors import InvalidRequest, NotFound
from blink.gateway import validation as v
from blink.gateway.auth import tenant_of
from blink.gateway.openai_http import read_json
from blink.gateway.service import Gateway, gateway_of
from blink.preload.store import ContextStore, Document, Metadata

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _metadata(raw: Any) -> Metadata:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("'metadata' must be an object", param="metadata")
    for key, value in raw.items():
        # non-finite floats are refused: the responses must be valid JSON, which has no NaN or Infinity
        if not isinstance(value, str | int | float) or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidRequest(f"'metadata.{key}' must be a string, number or boolean", param=f"metadata.{key}")
    return raw


def _summary(doc: Document) -> dict[str, Any]:
    return {
        "id": doc.id,
        "object": "document",
        "chunks": len(doc.chunks),
        "bytes": len(doc.text.encode()),
        "metadata": doc.metadata,
        "created": doc.created,
    }


# a POST body holds a document and the JSON around it: --max-request-bytes bounds the document, plus this
JSON_ROOM = 64 << 10


def _store(request: Request) -> ContextStore:
    stores = gateway_of(request).store
    assert stores is not None  # the routes exist only on a server with a document store (app.py)
    tenant = tenant_of(request.scope)
    store: ContextStore = stores.of(tenant.name, tenant.limits.max_documents, tenant.limits.max_document_bytes)
    return store


async def create_document(request: Request) -> Response:
    body = await read_json(request, gateway_of(request).config.max_request_bytes + JSON_ROOM)
    doc_id = v.get_str(body, "id")
    if doc_id is None:
        doc_id = Gateway.new_id("doc")
    elif not _ID.fullmatch(doc_id):
        raise InvalidRequest("'id' must be 1-128 characters of letters, digits, '.', '_', ':' or '-'", param="id")
    text = v.get_str(body, "text", required=True)
    assert text is not None
    doc = await _store(request).put(doc_id, text, _metadata(body.get("metadata")))
    return JSONResponse(_summary(doc), status_code=201)


async def list_documents(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_summary(doc) for doc in await _store(request).list()]})


async def retrieve_document(request: Request) -> Response:
    doc_id = request.path_params["id"]
    doc = await _store(request).get(doc_id)
    if doc is None:
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    body = {**_summary(doc), "text": doc.text}
    include = request.query_params.get("include")
    if include not in (None, "chunks"):
        raise InvalidRequest("'include' may only be 'chunks'", param="include")
    if include == "chunks":  # how the document was split for retrieval, in order
        body["chunk_texts"] = [chunk.text for chunk in doc.chunks]
    return JSONResponse(body)


async def delete_document(request: Request) -> Response:
    doc_id = request.path_params["id"]
    if not await _store(request).delete(doc_id):
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    return JSONResponse({"id": doc_id, "object": "document.deleted", "deleted": True})
