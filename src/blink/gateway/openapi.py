"""GET /openapi.json: an OpenAPI 3.1 description of blink's HTTP API, written as data.

The request schemas say what the handlers accept (openai_http.py, documents.py, validation.py): required fields,
types and ranges, so that a generator (schemathesis) makes bodies the server must take and bodies it must refuse
with a 4xx. Fields blink ignores are allowed (as OpenAI's clients send them). The WebSocket protocol at
/v1/realtime is described in realtime.py; OpenAPI has no words for it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from blink.gateway.service import gateway_of
from blink.gateway.validation import MAX_STOP_STRINGS

INT64 = {"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 63) - 1}
JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


def _responses(ok: str, *errors: int, stream: bool = False) -> dict[str, Any]:
    """`ok`'s 200 (or 201 for a created document) and the error statuses the operation may answer."""
    content: dict[str, Any] = {JSON: {"schema": {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {"201" if ok == "created" else "200": {"description": ok, "content": content}}
    for status in errors:
        out[str(status)] = {"description": "an error", "content": {JSON: {"schema": _ref("Error")}}}
    return out


def _sampling(max_tokens: int) -> dict[str, Any]:
    count = {
        "type": "integer",
        "minimum": 0,
        "maximum": max_tokens,
        "description": "0: prefill only (blink): the prompt's KV is computed into the prefix cache, no token",
    }
    optional = {
        "max_tokens": count,
        "max_completion_tokens": count,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 1 << 20},
        "seed": INT64,
        "stop": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS},
            ]
        },
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean", "description": "blink: generate max_tokens whatever the model says"},
        "cache": {"type": "boolean", "description": "blink: may the semantic cache answer (default true)"},
        "prediction": {
            "type": "object",
            "description": "Predicted Outputs: text the answer is expected to copy (verified: the answer is the same)",
            "required": ["type", "content"],
            "properties": {"type": {"type": "string", "enum": ["content"]}, "content": _text()},
        },
    }
    # as in OpenAI's API, an optional field given as null is as if absent (its default)
    return {"model": _ref("Model"), **{k: {"anyOf": [v, {"type": "null"}]} for k, v in optional.items()}}


def _text() -> dict[str, Any]:
    """A string, or a list of {type: "text", text} parts."""
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    }
    return {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}


def _message() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": _text(),
        },
    }


def _schemas(models: list[str], max_tokens: int) -> dict[str, Any]:
    scalar = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    return {
        "Model": {"type": "string", "enum": models},
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                **_sampling(max_tokens),
                "messages": {"type": "array", "minItems": 1, "items": _message()},
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "properties": {
                **_sampling(max_tokens),
                "prompt": {
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {"type": "string", "minLength": 1},
                        },
                    ]
                },
            },
        },
        "DocumentRequest": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                "text": {"type": "string", "minLength": 1, "pattern": "\\S"},
                "metadata": {"type": "object", "additionalProperties": scalar},
            },
        },
    }


def _generation(summary: str, schema: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "resume a stream: the id of the last SSE event received (<response id>:<index>)",
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": _json_body(_ref(schema)),
            "responses": _responses("the answer (stream: SSE)", 400, 404, 413, 415, 429, 503, 504, stream=True),
        }
    }


_INCLUDE = {"type": "string", "enum": ["chunks"]}


def _documents() -> dict[str, Any]:
    doc_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "/v1/documents": {
            "post": {
                "summary": "Store a document (for retrieval in realtime sessions)",
                "requestBody": _json_body(_ref("DocumentRequest")),
                "responses": _responses("created", 400, 413, 415),
            },
            "get": {"summary": "List the documents", "responses": _responses("the documents")},
        },
        "/v1/documents/{id}": {
            "get": {
                "summary": "A document (with include=chunks, its chunks' texts as chunk_texts)",
                "parameters": [*doc_id, {"name": "include", "in": "query", "required": False, "schema": _INCLUDE}],
                "responses": _responses("the document", 400, 404),
            },
            "delete": {"summary": "Delete a document", "parameters": doc_id, "responses": _responses("deleted", 404)},
        },
    }


def _probe(summary: str, *, text: bool = False, not_ready: bool = False) -> dict[str, Any]:
    responses = _responses(summary)
    if text:
        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    if not_ready:
        responses["503"] = {**responses["200"], "description": "not ready (the same body)"}
    return {"get": {"summary": summary, "security": [], "responses": responses}}


def openapi_document(models: list[str], max_tokens: int, *, documents: bool) -> dict[str, Any]:
    """The description of a server that serves `models`, with `max_tokens` the most tokens it generates for one
    request (its replicas' context length) and /v1/documents if `documents`."""
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generation("Chat completion (OpenAI-compatible)", "ChatCompletionRequest"),
        "/v1/completions": _generation("Text completion (OpenAI-compatible)", "CompletionRequest"),
        "/v1/models": {"get": {"summary": "The models served", "responses": _responses("the models")}},
        "/v1/cache": {
            "delete": {
                "summary": "Drop the caller's semantic cache entries (of one model if named)",
                "parameters": [{"name": "model", "in": "query", "required": False, "schema": _ref("Model")}],
                "responses": _responses("what was dropped", 400, 404),
            }
        },
        **(_documents() if documents else {}),
        "/healthz": _probe("the process is alive"),
        "/readyz": _probe("ready: a replica of each model serves", not_ready=True),
        "/metrics": _probe("Prometheus metrics", text=True),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "blink", "version": "1", "description": "Real-time LLM serving (OpenAI-compatible)"},
        "paths": paths,
        "components": {
            "schemas": _schemas(models, max_tokens),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],  # the key names the tenant; a server without keys takes none
    }


async def openapi_endpoint(request: Request) -> Response:
    """GET /openapi.json, for the app's gateway (its models, and its replicas' context length once one is ready)."""
    gateway = gateway_of(request)
    max_tokens = gateway.max_model_len(gateway.default_model)
    return JSONResponse(openapi_document(gateway.models, max_tokens, documents=gateway.store is not None))
