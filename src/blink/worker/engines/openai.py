"""`--engine openai`: any OpenAI-compatible server (llama-server, `vllm serve`, SGLang, TGI, another blink) as the
engine of a replica, over one pooled keep-alive HTTP client.

A chat request goes to the upstream's /v1/chat/completions, a plain prompt to /v1/completions, both streamed with
usage in the last chunk (`stream_options.include_usage`). Cancel closes the stream: the upstream sees its client
go and frees the request. A pre-load is a one-token request for the conversation with the message being typed as
it stands, so the upstream's prompt cache holds that prefix (llama-server's `cache_prompt`, vLLM's automatic prefix
caching) when the real request comes. A tenant's requests carry
`cache_salt` (vLLM's per-tenant prefix-cache partition; servers that do not know it ignore it). Health is the
upstream's /health (or blink's /readyz) answering 200.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from blink.bus.messages import FinishStatus, GenerateRequest
from blink.errors import CODES
from blink.worker.engines.base import Delta, End, EngineLoad

log = logging.getLogger("blink.worker")

HEALTH_PATHS = ("/health", "/readyz")
_FINISH = {"stop": FinishStatus.STOP, "length": FinishStatus.LENGTH}


class UpstreamError(Exception):
    """The upstream cannot serve: unreachable, or it does not have the model."""


class OpenAIUpstream:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str = "",
        *,
        api_key: str = "",
        max_model_len: int = 2048,
        max_connections: int = 256,
        connect_timeout_s: float = 5.0,
        start_timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`model`: the upstream's model id ('' takes the first it lists); `max_model_len`: its context, unless
        its /v1/models says (vLLM does)."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.max_model_len = max_model_len
        self.start_timeout_s = start_timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # no read timeout: a stream waits as long as the request's deadline allows (the replica bounds it)
        timeout = httpx.Timeout(None, connect=connect_timeout_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, limits=limits, timeout=timeout, transport=transport
        )
        self._running = 0

    async def start(self) -> None:
        """Wait for the upstream to be ready (it may still be loading its model), then check it has ours."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                if await self.healthy():
                    models = await self._models()
                    break
                problem = "not ready"
            except (httpx.HTTPError, ValueError) as exc:
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise UpstreamError(f"{self.base_url} was not ready within {self.start_timeout_s:g} s: {problem}")
            await asyncio.sleep(0.5)
        ids = [str(m.get("id")) for m in models]
        if not self.model:
            if not ids:
                raise UpstreamError(f"{self.base_url}/v1/models lists no model")
            self.model = ids[0]
        elif ids and self.model not in ids:
            raise UpstreamError(f"{self.base_url} does not serve {self.model!r} (it lists {', '.join(ids)})")
        for m in models:
            if m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                self.max_model_len = m["max_model_len"]
        log.info("upstream %s serves %s (context %d tokens)", self.base_url, self.model, self.max_model_len)

    async def _models(self) -> list[dict[str, Any]]:
        response = await self._http.get("/v1/models", timeout=httpx.Timeout(5.0))
        response.raise_for_status()
        data = response.json().get("data")
        if not isinstance(data, list):
            raise ValueError("no 'data' list in /v1/models")
        return [m for m in data if isinstance(m, dict)]

    async def healthy(self) -> bool:
        """Ready to serve: /health answers 200 (vLLM, llama-server, SGLang, TGI; 503 while loading), else
        /readyz (blink), else, where the upstream has neither, /v1/models answers."""
        try:
            for path in HEALTH_PATHS:
                response = await self._http.get(path, timeout=httpx.Timeout(5.0))
                if response.status_code != 404:
                    return response.status_code == 200
            await self._models()
        except (httpx.HTTPError, ValueError):
            return False
        return True

    async def close(self) -> None:
        await self._http.aclose()

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, max_model_len=self.max_model_len, speculative="upstream")

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Delta | End, None]:
        path, body = self._body(request)
        # W3C trace context: an upstream that traces (vLLM, blink) makes its spans children of this request's
        headers = {"traceparent": request.traceparent} if request.traceparent else {}
        self._running += 1
        try:
            for attempt in range(2):
                started = False
                try:
                    async with self._http.stream("POST", path, json=body, headers=headers) as response:
                        started = True
                        if response.status_code != 200:
                            yield _error(response.status_code, await response.aread())
                            return
                        async for item in _events(response, chat=request.messages is not None):
                            if not request.prefill_only:
                                yield item
                            elif isinstance(item, End):  # a pre-load says nothing, and ends once its prompt is in
                                done = item.status is not FinishStatus.ERROR
                                yield dataclasses.replace(item, status=FinishStatus.STOP) if done else item
                    return
                except httpx.RemoteProtocolError:
                    # a pooled connection the upstream had closed while idle (llama-server does): once more on a
                    # new one, as long as nothing came back on the old
                    if started or attempt:
                        raise
        except httpx.HTTPError as exc:
            yield End(FinishStatus.ERROR, error_code="engine_failure", error_message=f"upstream: {exc!r}")
        except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not the shape of an OpenAI chunk
            yield End(FinishStatus.ERROR, error_code="engine_failure", error_message=f"upstream's stream: {exc!r}")
        finally:
            self._running -= 1

    def _body(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if request.prefill_only:
            body |= {"max_tokens": 1, "temperature": 0.0}
        else:
            body |= {"temperature": s.temperature, "top_p": s.top_p}
            if s.max_tokens is not None:
                body["max_tokens"] = s.max_tokens
            if s.top_k:
                body["top_k"] = s.top_k
            if s.seed is not None:
                body["seed"] = s.seed
            if s.stop:
                body["stop"] = list(s.stop)
            if s.ignore_eos:
                body["ignore_eos"] = True
            if request.prediction:
                body["prediction"] = {"type": "content", "content": request.prediction}
        if request.tenant is not None:  # vLLM's per-tenant prefix-cache partition (a digest: no name leaves)
            body["cache_salt"] = hashlib.sha256(f"blink-tenant:{request.tenant}".encode()).hexdigest()[:32]
        if request.messages is None:
            return "/v1/completions", body | {"prompt": request.prompt or ""}
        # a pre-load's last message is still being typed: sent as it stands, its template's tokens up to the
        # text typed so far are the finished prompt's first tokens, which the upstream's prompt cache then holds
        return "/v1/chat/completions", body | {"messages": list(request.messages)}


async def _events(response: httpx.Response, *, chat: bool) -> AsyncGenerator[Delta | End, None]:
    """An OpenAI stream's text deltas, then its End (with the usage of the last chunk)."""
    tokens, reason, usage = 0, None, {}
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":  # read on to the body's end: a connection read to its end goes back to the pool
            continue
        chunk = json.loads(data)
        if isinstance(chunk.get("error"), dict):  # an error in the middle of the stream
            err = chunk["error"]
            yield End(
                FinishStatus.ERROR,
                error_code=str(err.get("code") or "engine_failure"),
                error_message=str(err.get("message") or err),
            )
            return
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                if not isinstance(text, str):
                    raise TypeError(f"a chunk's text is {type(text).__name__}, not a string")
                tokens += 1
                yield Delta(text, tokens)
            reason = choice.get("finish_reason") or reason
    details = usage.get("prompt_tokens_details") or {}
    yield End(
        _FINISH.get(str(reason), FinishStatus.STOP),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or tokens),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def _error(status: int, raw: bytes) -> End:
    """The upstream's error answer as the request's end: its OpenAI error object where it sends one."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        err = None
    if not isinstance(err, dict):
        err = {"message": raw.decode(errors="replace")[:500]}
    theirs = str(err.get("code") or err.get("type") or "")
    # their code where it is one of ours (another blink upstream); else the kind of error their status says
    code = theirs if theirs in CODES else "overloaded" if status == 429 else "invalid_request" if status < 500 else ""
    return End(
        FinishStatus.ERROR,
        error_code=code or "engine_failure",
        error_message=f"upstream HTTP {status}{f' ({theirs})' if theirs else ''}: {err.get('message') or ''}".strip(),
        error_param=err.get("param") if isinstance(err.get("param"), str) else None,
    )
