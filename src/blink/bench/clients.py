"""The drivers that play one session against a server: blink's realtime WebSocket, or OpenAI-compatible SSE.

A driver never raises for the server's failures: an error event, an HTTP error, a dropped connection or a
timeout ends the session as `Outcome.ERROR` with the reason in `Result.error` ("kind: detail"). Times are
`time.perf_counter()` seconds; a result's are relative to the run's start (`t0`) or to the submit.

    ws   connect; session.update {model, temperature, max_output_tokens, cache[, retrieval]}; context.open (if
         the session opens a document); one input_text.draft per typed word, --typing-ms apart;
         conversation.item.create; response.create (the submit); deltas; response.cancel after
         `interrupt_after` deltas if the user interrupts; response.done
    sse  wait as long as the typing takes (no drafts on this protocol); POST /v1/chat/completions stream=true
         (the submit); chunks; close the stream after `interrupt_after` text chunks if the user interrupts
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, WebSocketException

from blink.bench.workload import Job, Stage, documents
from blink.config import BenchConfig

DOCUMENT_TOP_K = 2  # retrieval chunks of a session that opened a document


class Outcome(StrEnum):
    COMPLETED = "completed"  # the answer ended: a stop, or max_tokens
    INTERRUPTED = "interrupted"  # the user cancelled it midway, as planned
    ERROR = "error"


@dataclass
class Result:
    job: int
    start_s: float  # the session started (the user began typing), seconds after the run's start
    users: int = 0  # closed loop: the users of the stage it started in; open loop: 0
    submit_s: float | None = None  # the user submitted, seconds after the run's start
    stamps: list[float] = field(default_factory=list)  # each text delta's arrival, seconds after the submit
    outcome: Outcome = Outcome.ERROR
    output_tokens: int = 0  # the server's count when it gives one, else the deltas
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None
    end_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return self.stamps[0] if self.stamps else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first: (output tokens - 1) / (last delta - first delta)."""
        if len(self.stamps) < 2 or self.output_tokens < 2 or self.stamps[-1] <= self.stamps[0]:
            return None
        return (self.output_tokens - 1) / (self.stamps[-1] - self.stamps[0])

    def fail(self, kind: str, detail: str) -> None:
        self.outcome, self.error = Outcome.ERROR, f"{kind}: {detail}"[:300]


@dataclass(frozen=True)
class Target:
    url: str  # http(s)://host:port, optionally ending in /v1
    protocol: str
    label: str

    @property
    def base(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1")


class Driver(Protocol):
    async def prepare(self) -> None:
        """Check the server answers and store what the sessions need; raises ConnectionError if it does not."""

    async def run(self, job: Job, t0: float, users: int = 0) -> Result: ...

    async def close(self) -> None: ...


class _Refused(Exception):
    """The server sent an error event for one of the session's events (other than a late response.cancel)."""


_FAILURES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (TimeoutError, "timeout"),  # before OSError, its base
    (_Refused, "refused"),
    ((OSError, InvalidHandshake, httpx.ConnectError), "connect"),
    ((WebSocketException, httpx.HTTPError), "disconnected"),
    ((json.JSONDecodeError, KeyError, TypeError, ValueError), "protocol"),
)


def failure(e: Exception, timeout_s: float) -> tuple[str, str]:
    """(kind, detail) of a session ended by the server's failure (a driver never raises for those); re-raises
    anything else (a bug in the driver)."""
    for types, kind in _FAILURES:
        if isinstance(e, types):
            if kind == "timeout":
                return kind, f"no end within {timeout_s:g} s"
            return kind, str(e) if kind == "refused" else f"{type(e).__name__}: {e}"
    raise e


class _Base:
    def __init__(self, target: Target, cfg: BenchConfig) -> None:
        self.target, self.cfg = target, cfg
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(headers=self.headers, timeout=httpx.Timeout(30.0), limits=limits)

    async def prepare(self) -> None:
        try:
            response = await self.http.get(self.target.base + "/v1/models", timeout=10)
        except httpx.HTTPError as e:
            raise ConnectionError(f"{self.target.base}: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            raise ConnectionError(f"{self.target.base}/v1/models: HTTP {response.status_code}")

    async def close(self) -> None:
        await self.http.aclose()

    async def run(self, job: Job, t0: float, users: int = 0) -> Result:
        # The job's own start, the instant the closed loop chose its stage by: a clock read here, a moment later,
        # can fall in the next stage and count this session there with the last stage's users.
        result = Result(job.index, job.at_s, users)
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                await self.session(job, result, t0)
        except Exception as e:
            result.fail(*failure(e, self.cfg.request_timeout_s))
        result.end_s = time.perf_counter() - t0
        if result.outcome is not Outcome.ERROR and result.output_tokens == 0:
            result.output_tokens = len(result.stamps)
        return result

    async def session(self, job: Job, result: Result, t0: float) -> None:
        raise NotImplementedError


class WsDriver(_Base):
    """blink's realtime protocol, one connection per session."""

    async def prepare(self) -> None:
        await super().prepare()
        if self.cfg.document_fraction <= 0:
            return
        for doc_id, text in documents(self.cfg.seed):
            response = await self.http.post(self.target.base + "/v1/documents", json={"id": doc_id, "text": text})
            if response.status_code != 201:
                raise ConnectionError(f"storing document {doc_id}: HTTP {response.status_code} {response.text[:200]}")

    @property
    def ws_url(self) -> str:
        base = self.target.base
        scheme, sep, rest = base.partition("://")
        ws_scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
        return f"{ws_scheme}{sep}{rest}/v1/realtime"

    async def session(self, job: Job, result: Result, t0: float) -> None:
        cfg = self.cfg
        async with connect(self.ws_url, additional_headers=self.headers, max_size=None) as ws:
            await _expect(ws, "session.created")
            settings: dict[str, Any] = {
                "model": cfg.model,
                "temperature": cfg.temperature,
                "max_output_tokens": job.max_tokens,
                "cache": cfg.server_cache,
            }
            if job.document is not None:
                settings["retrieval"] = {"top_k": DOCUMENT_TOP_K}
            await _send(ws, {"type": "session.update", "session": settings, "event_id": "update"})
            await _expect(ws, "session.updated")
            if job.document is not None:
                doc_id = documents(cfg.seed)[job.document][0]
                await _send(ws, {"type": "context.open", "document_ids": [doc_id], "event_id": "open"})
            for words in range(1, len(job.question) + 1):
                await asyncio.sleep(cfg.typing_ms / 1000)
                await _send(ws, {"type": "input_text.draft", "text": job.draft(words), "event_id": "draft"})
            content = [{"type": "input_text", "text": job.prompt}]
            item = {"type": "message", "role": "user", "content": content}
            await _send(ws, {"type": "conversation.item.create", "item": item, "event_id": "item"})
            await _expect(ws, "conversation.item.done")
            submitted = time.perf_counter()
            result.submit_s = submitted - t0
            await _send(ws, {"type": "response.create", "event_id": "create"})
            await self._read_answer(ws, job, result, submitted)

    async def _read_answer(self, ws: ClientConnection, job: Job, result: Result, submitted: float) -> None:
        cancelled = False
        while True:
            event = await _recv(ws)
            kind = event["type"]
            if kind == "response.output_text.delta":
                result.stamps.append(time.perf_counter() - submitted)
                if job.interrupt_after is not None and len(result.stamps) >= job.interrupt_after and not cancelled:
                    await _send(ws, {"type": "response.cancel", "event_id": "cancel"})
                    cancelled = True
            elif kind == "response.done":
                _finish_ws(event["response"], result, cancelled)
                return


def _finish_ws(response: dict[str, Any], result: Result, cancelled: bool) -> None:
    usage = response.get("usage") or {}
    result.output_tokens = int(usage.get("output_tokens") or 0)
    result.prompt_tokens = usage.get("input_tokens")
    result.cached_tokens = (usage.get("input_token_details") or {}).get("cached_tokens")
    status, details = response.get("status"), response.get("status_details") or {}
    if status == "cancelled" and cancelled:
        result.outcome = Outcome.INTERRUPTED
    elif status == "completed" or (status == "incomplete" and details.get("reason") == "max_output_tokens"):
        result.outcome = Outcome.COMPLETED
    else:
        error = details.get("error") or {}
        result.fail(f"response {status}", str(error.get("code") or details.get("reason") or details))


async def _send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    """The next event; raises _Refused on an error event, except one for a response.cancel (the answer ended before
    the cancel arrived: not an error)."""
    while True:
        event: dict[str, Any] = json.loads(await ws.recv())
        if event.get("type") != "error":
            return event
        error = event.get("error") or {}
        if error.get("event_id") != "cancel":
            raise _Refused(f"{error.get('code')} ({error.get('event_id')}): {error.get('message')}")


async def _expect(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        event = await _recv(ws)
        if event["type"] == kind:
            return event


def chat_body(cfg: BenchConfig, text: str, max_tokens: int, *, ignore_eos: bool) -> dict[str, Any]:
    """A streamed chat completion of one user message, as every OpenAI-compatible server takes it."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if not cfg.server_cache:
        body["cache"] = False  # blink's semantic cache; other servers ignore the field
    return body


class SseDriver(_Base):
    """OpenAI chat completions with stream=true: blink, llama.cpp's llama-server, vLLM, ..."""

    async def session(self, job: Job, result: Result, t0: float) -> None:
        cfg = self.cfg
        body = chat_body(cfg, job.prompt, job.max_tokens, ignore_eos=cfg.ignore_eos)
        await asyncio.sleep(len(job.question) * cfg.typing_ms / 1000)
        submitted = time.perf_counter()
        result.submit_s = submitted - t0
        url = self.target.base + "/v1/chat/completions"
        async with self.http.stream("POST", url, json=body, timeout=httpx.Timeout(None)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.fail("http", f"{response.status_code} {_error_code(text)}")
                return
            done = await _read_sse(response, job, result, submitted)
        if result.outcome is Outcome.INTERRUPTED or result.error is not None:
            return
        if done:
            result.outcome = Outcome.COMPLETED
        else:
            result.fail("disconnected", "the stream ended without [DONE]")


async def _read_sse(response: httpx.Response, job: Job, result: Result, submitted: float) -> bool:
    """Reads chunks into `result` until [DONE] (returns True), the user interrupts, an error chunk, or the end."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            result.fail("stream error", _error_code(json.dumps(chunk)))
            return False
        _usage(chunk, result)
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                result.stamps.append(time.perf_counter() - submitted)
                if job.interrupt_after is not None and len(result.stamps) >= job.interrupt_after:
                    result.outcome = Outcome.INTERRUPTED  # closing the stream is the cancel
                    return False
    return False


class Usage(Protocol):
    output_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None


def _usage(chunk: dict[str, Any], result: Usage) -> None:
    usage = chunk.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = usage.get("prompt_tokens")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is None:  # llama.cpp's server reports it in its timings
            cached = (chunk.get("timings") or {}).get("cache_n")
        result.cached_tokens = cached


def _error_code(text: str) -> str:
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        return text[:120]
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or error.get("message"))[:120]
    return str(error)[:120]


DRIVERS: dict[str, Callable[[Target, BenchConfig], Driver]] = {"ws": WsDriver, "sse": SseDriver}


@dataclass
class Run:
    """One target's measured sessions."""

    target: Target
    results: list[Result]
    wall_s: float  # the clock's start to the last session's end
    stages: list[Stage] = field(default_factory=list)  # closed loop only
    planned: int | None = None  # open loop: the sessions the arrivals asked for
    started: str = ""  # ISO time of the clock's start
    load: tuple[float, ...] = ()  # the machine's load average (1, 5, 15 min) before the warm-up
