"""OpenAI-compatible HTTP: POST /v1/chat/completions, POST /v1/completions (stream: SSE), GET /v1/models.

Streams end with `data: [DONE]`. An error before the first byte is an HTTP status with an OpenAI error body;
an error after it (the replica failed, the server is shutting down) is an SSE event `{"error": {...}}`.
A client that disconnects from a non-streaming request cancels its generation. A stream's events carry SSE ids
`<response id>:<delta index>` (-1: the opening chunk); a client that lost the stream sends the same request
again with the header `Last-Event-ID: <the last id it got>` and receives the rest (gateway/resume.py: a stream
runs on --resume-window-s after its client vanished, then it is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from blink.bus.messages import FinishStatus, GenerateRequest
from blink.errors import BlinkError, InvalidRequest, RequestTooLarge, ShuttingDown, from_wire
from blink.gateway import validation as v
from blink.gateway.auth import tenant_of
from blink.gateway.generation import Generation
from blink.gateway.resume import ResponseLog
from blink.gateway.service import Gateway, gateway_of
from blink.gateway.wire import error_body, sse

_EVENT_INDEX = re.compile(r"-?[0-9]{1,18}")  # ASCII digits (str.isdigit() also takes "²", which int() refuses)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's body, a JSON object of at most `limit` bytes sent as application/json (the Content-Type is
    checked before the body is read)."""
    v.check_json_media_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    # ASCII digits only (isdigit() alone takes "²", which int() refuses), and no int() of thousands of digits
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise RequestTooLarge(f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes")
    return v.parse_object(bytes(body))


def parse_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        role = v.get_str(msg, "role", required=True, param=f"{where}.role")
        if role not in ROLES:
            raise InvalidRequest(f"'{where}.role' must be one of {sorted(ROLES)}", param=f"{where}.role")
        out.append({"role": ROLES[role], "content": v.content_text(msg.get("content"), f"{where}.content")})
    return tuple(out)


def _common(gateway: Gateway, body: dict[str, Any]) -> tuple[str, bool, bool, Any]:
    """The fields both endpoints share, validated. Readiness is not checked here (`Gateway.generate` does, after
    the whole body is known to be valid), so a malformed request is a 400 even while replicas are warming."""
    model = v.get_str(body, "model", required=True)
    assert model is not None
    gateway.check_model(model)
    v.get_number(body, "n", 1, 1, integer=True)  # one choice per request
    stream = v.get_bool(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    include_usage = v.get_bool(options, "include_usage", False)
    sampling = v.get_sampling(
        body,
        max_tokens_keys=("max_completion_tokens", "max_tokens"),
        max_model_len=gateway.max_model_len(model),
        default_temperature=1.0,
        allow_zero=True,
    )
    return model, stream, include_usage, sampling


def _prefill_only(req: GenerateRequest) -> GenerateRequest:
    """max_tokens 0: compute the prompt's KV into the prefix cache and answer nothing (a client that knows what it
    sends next: the request that follows with this prompt prefills only its last partial block and what it adds)."""
    if req.sampling.max_tokens != 0:
        return req
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, max_tokens=1), prefill_only=True)


def _finish_reason(gen: Generation) -> str:
    assert gen.finished is not None
    if gen.request.prefill_only and gen.finished.status is FinishStatus.STOP:
        return "length"  # max_tokens 0 reached: no token
    return gen.finished.status.value


def _usage(gen: Generation) -> dict[str, Any]:
    fin = gen.finished
    prompt = fin.prompt_tokens if fin and fin.prompt_tokens else gen.prompt_tokens
    completion = fin.completion_tokens if fin else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens if fin else 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": fin.prediction_accepted if fin else 0,
            "rejected_prediction_tokens": fin.prediction_rejected if fin else 0,
        },
    }


def _failure(gen: Generation) -> BlinkError | None:
    """The error to report for a generation that did not end normally, else None. Only server-side cancels
    reach here: a client that disconnected is not answered."""
    fin = gen.finished
    assert fin is not None
    if fin.status is FinishStatus.ERROR:
        return from_wire(fin.error_code or "", fin.error_message or "", fin.error_param)
    if fin.status is FinishStatus.CANCELLED:
        return ShuttingDown("the server is shutting down; the response was stopped before it finished")
    return None


async def models(request: Request) -> Response:
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "blink"} for m in gateway_of(request).models]
    return JSONResponse({"object": "list", "data": data})


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    """POST /v1/chat/completions (`chat`) or /v1/completions: a resumed stream, or a new request's answer."""
    started = time.monotonic()
    resumed = _resume(request, chat=chat)
    if resumed is not None:
        return resumed
    gateway = gateway_of(request)
    body = await read_json(request, gateway.config.max_request_bytes)
    model, stream, include_usage, sampling = _common(gateway, body)
    prediction = v.get_prediction(body)
    if chat:
        messages = parse_messages(body.get("messages"))
        req = GenerateRequest(gateway.new_id("chatcmpl"), model, sampling, messages=messages, prediction=prediction)
    else:
        req = GenerateRequest(gateway.new_id("cmpl"), model, sampling, prompt=_prompt(body), prediction=prediction)
    return await _respond(request, _prefill_only(req), body, started, stream, include_usage, chat=chat)


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string (one prompt per request)", param="prompt")
    if not prompt:
        raise InvalidRequest("'prompt' is empty", param="prompt")
    return prompt


async def _respond(
    request: Request,
    req: GenerateRequest,
    body: dict[str, Any],
    started: float,
    stream: bool,
    include_usage: bool,
    *,
    chat: bool,
) -> Response:
    gateway, tenant = gateway_of(request), tenant_of(request.scope)
    use_cache = v.get_bool(body, "cache", True)  # blink's per-request opt-out of the semantic cache
    gen = await gateway.generate(
        req,
        started=started,
        tenant=tenant,
        use_cache=use_cache,
        traceparent=request.headers.get("traceparent"),  # W3C trace context: the response's trace joins it
    )
    headers = {"X-Blink-Cache": gen.cache_status, "X-Blink-Route": _route(gen), **gateway.limits.headers(tenant)}
    if stream:
        base = {
            "id": req.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(req.created),
            "model": gen.request.model,  # the model that answers (an edge's `auto` resolved)
        }
        finish = functools.partial(_closing_chunks, base=base, include_usage=include_usage, chat=chat)
        entry = gateway.responses.start(gen, tenant.name, finish, api=_api(chat), base=base)
        return _event_stream(entry, -1, headers)
    try:
        await _until_done_or_disconnect(gen, request)
    finally:
        await gen.close()
    if gen.cancel_reason == "disconnect":
        # nobody is left to read an answer; 499 (nginx's "client closed request") only marks the access log
        return Response(status_code=499)
    return JSONResponse(_completion(req, gen, chat=chat), headers=headers)


def _completion(req: GenerateRequest, gen: Generation, *, chat: bool) -> dict[str, Any]:
    """The whole answer of a request that did not stream (raises the error a failed one ended with)."""
    error = _failure(gen)
    if error is not None:
        raise error
    reason = _finish_reason(gen)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": gen.text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": gen.text, "finish_reason": reason, "logprobs": None}
    return {
        "id": req.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(req.created),
        "model": gen.request.model,
        "choices": [choice],
        "usage": _usage(gen),
        "timings": gen.timings(),  # blink's (as llama.cpp's server does): queue, prefill, speculative, ...
        "cache": gen.cache_status,
    }


def _resume(request: Request, *, chat: bool) -> Response | None:
    """The rest of a stream this endpoint started, for a request with `Last-Event-ID: <response id>:<delta
    index>` (the body, the original request sent again, is not read); None for a request without the header."""
    last = request.headers.get("last-event-id")
    if last is None:
        return None
    response_id, _, index = last.strip().rpartition(":")
    if not response_id or not _EVENT_INDEX.fullmatch(index):
        raise InvalidRequest(
            "'Last-Event-ID' must be an event id of a blink stream: '<response id>:<index>'", param="Last-Event-ID"
        )
    entry = gateway_of(request).responses.get(response_id, tenant_of(request.scope).name, _api(chat))
    gen = entry.generation
    return _event_stream(entry, max(-1, int(index)), {"X-Blink-Cache": gen.cache_status, "X-Blink-Route": _route(gen)})


def _api(chat: bool) -> str:
    """The API a stream belongs to (gateway/resume.py): only its own endpoint resumes it."""
    return "chat.completions" if chat else "completions"


def _event_stream(entry: ResponseLog[Generation], after: int, headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        _follow(entry, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


def _chunk(
    base: dict[str, Any],
    text: str | None,
    finish: str | None,
    *,
    chat: bool,
    role: bool = False,
    index: int | None = None,
) -> bytes:
    """One SSE chunk; `index`: the delta index it carries, which names the event (its SSE id) for a resume."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return sse({**base, "choices": [choice]}, event_id=None if index is None else f"{base['id']}:{index}")


async def _closing_chunks(gen: Generation, *, base: dict[str, Any], include_usage: bool, chat: bool) -> list[bytes]:
    """A stream's last events: the finish chunk (or an error event), usage if asked for, [DONE]."""
    out = []
    error = _failure(gen)
    if error is not None:
        out.append(sse(error_body(error)))
    else:
        out.append(_chunk(base, None if chat else "", _finish_reason(gen), chat=chat))
        if include_usage:
            out.append(sse({**base, "choices": [], "usage": _usage(gen), "timings": gen.timings()}))
    out.append(sse("[DONE]"))
    return out


async def _follow(entry: ResponseLog[Generation], after: int) -> AsyncIterator[bytes]:
    """The SSE events of a stream after delta index `after` (-1 also sends the opening chunk), live. A client
    that disconnects ends only this reader (the generator is closed): the response runs on for a resume."""
    base, chat = entry.meta["base"], entry.api == _api(True)
    entry.attach()
    try:
        if after < 0 and chat:
            yield _chunk(base, None, None, chat=True, role=True, index=-1)
        async for index, text in entry.follow(after):
            yield _chunk(base, text, None, chat=chat, index=index)
        for event in entry.final or ():
            yield event
    finally:
        entry.detach()


async def _until_done_or_disconnect(gen: Generation, request: Request) -> None:
    collect = asyncio.ensure_future(gen.collect())
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not collect.done():
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _route(gen: Generation) -> str:
    """X-Blink-Route: where the answer comes from (edge, core, cache), "; degraded" when an edge answered for an
    unreachable core."""
    return gen.route + ("; degraded" if gen.degraded else "")
