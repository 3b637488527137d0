"""Resumable responses: a response runs detached from the connection that asked for it, so a client that lost its
connection can reconnect and continue it without losing or repeating text.

    log = gateway.responses.start(generation, tenant, finish, api=...)   # a pump task drives the generation
    log.attach(); async for index, text in log.follow(after=-1): ...; log.detach()   # readers, each from its point
    log.final                                                    # then what `finish(generation)` made of its end

The pump appends each delta to the log (index 0, 1, 2, ...) and, when the generation ends, stores `finish`'s
result (the API's closing events). A reader that detaches (its client vanished) leaves the response running; when
no reader is attached for `window` seconds the response is cancelled (the replica frees its sequence), and a
finished log is kept `window` seconds for a late resume, then forgotten. `window` 0: the last reader leaving
cancels at once (no resume). Resume reaches the gateway that runs the response (its log lives in its memory).

A response resumes only over the API that started it (`api`: "chat.completions", "completions", "realtime"):
each formats its stream from its own `meta` and its own closing events, so another API's id is not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from blink.errors import NotFound

log = logging.getLogger("blink.gateway.resume")


class Generation(Protocol):
    """What a log drives (service.Generation; a protocol here, so this module needs nothing of the service)."""

    request_id: str

    def deltas(self) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...

    async def cancel(self, reason: str) -> None: ...


G = TypeVar("G", bound=Generation)
Finish = Callable[[G], Awaitable[list[Any]]]  # the generation -> the API's closing events
Background = Callable[[Coroutine[Any, Any, Any]], None]  # runs a coroutine detached (the gateway's `background`)


class ResponseLog(Generic[G]):
    def __init__(self, registry: Responses, generation: G, tenant: str | None, api: str, meta: dict[str, Any]) -> None:
        self.registry = registry
        self.generation = generation
        self.response_id = generation.request_id
        self.tenant = tenant
        self.api = api  # the API that started it: the only one that can format (so resume) it
        self.meta = meta  # what an API needs to format a resumed stream (e.g. the SSE chunks' id, model, created)
        self.deltas: list[str] = []
        self.final: list[Any] | None = None  # set when the response ended: the API's closing events
        self.readers = 0
        self._changed = asyncio.Event()
        self._orphaned: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    async def run(self, finish: Finish[G]) -> None:
        gen = self.generation
        try:
            async for text in gen.deltas():
                self.deltas.append(text)
                self._wake()
            self.final = await finish(gen)
        except Exception:  # a bug formatting the end must still end every reader's stream
            log.exception("response %s: the pump failed", self.response_id)
            self.final = []
        finally:
            if self.final is None:  # cancelled (shutdown): the readers end without closing events
                self.final = []
            self._wake()
            await gen.close()
            self.registry.expire_later(self)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[tuple[int, str]]:
        """Deltas after index `after` as (index, text), live until the response ends; then read `final`. Call it
        between `attach()` and `detach()`."""
        index = after + 1
        while True:
            while index < len(self.deltas):
                yield index, self.deltas[index]
                index += 1
            if self.done:
                return
            await self._changed.wait()

    def attach(self) -> None:
        """A client reads the response: it runs on while one does. Pair it with `detach()` (in a finally)."""
        self.readers += 1
        if self._orphaned is not None:
            self._orphaned.cancel()
            self._orphaned = None

    def detach(self) -> None:
        """The client stopped reading (it finished, or vanished): with nobody left, the response waits
        `window` seconds for one to come back, then is cancelled."""
        self.readers -= 1
        if self.readers or self.done:
            return
        window = self.registry.window
        if window <= 0:
            self._abandon()
        else:
            self._orphaned = asyncio.get_running_loop().call_later(window, self._abandon)

    def _abandon(self) -> None:
        """Nobody came back for it: stop the replica's work."""
        self._orphaned = None
        if not self.done and not self.readers:
            log.debug("response %s: no client for %.1f s; cancelled", self.response_id, self.registry.window)
            self.registry.background(self.generation.cancel("disconnect"))


class Responses:
    """The resumable responses of one gateway, by response id."""

    def __init__(self, background: Background, window: float) -> None:
        self.background = background
        self.window = window  # seconds a response waits for a client to come back
        self._logs: dict[str, ResponseLog[Any]] = {}

    def start(self, generation: G, tenant: str | None, finish: Finish[G], *, api: str, **meta: Any) -> ResponseLog[G]:
        entry = ResponseLog(self, generation, tenant, api, meta)
        self._logs[entry.response_id] = entry
        entry.pump = asyncio.get_running_loop().create_task(entry.run(finish))
        return entry

    def get(self, response_id: str, tenant: str | None, api: str) -> ResponseLog[Any]:
        """The log of a running (or recently ended) response of `tenant` started over `api`; NotFound otherwise
        (another tenant's response is not found either: its existence is not revealed; nor is another API's)."""
        entry = self._logs.get(response_id)
        if entry is None or entry.tenant != tenant or entry.api != api:
            raise NotFound(
                f"no response {response_id!r} to resume here: unknown, another key's, another API's, on another "
                f"gateway, or ended over {self.window:g} s ago",
                param="response_id",
                code="response_not_found",
            )
        return entry

    def expire_later(self, entry: ResponseLog[Any]) -> None:
        def forget() -> None:
            if self._logs.get(entry.response_id) is entry:
                del self._logs[entry.response_id]

        if self.window <= 0:
            forget()
        else:
            asyncio.get_running_loop().call_later(self.window, forget)

    async def close(self) -> None:
        """Wait for the pumps (the gateway's shutdown has cancelled their generations), then for the readers
        still attached to send the closing events."""
        pumps = [e.pump for e in self._logs.values() if e.pump is not None and not e.pump.done()]
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        while any(e.readers for e in self._logs.values()):
            await asyncio.sleep(0.01)

    def __len__(self) -> int:
        return len(self._logs)
