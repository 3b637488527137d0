"""Predictive pre-loading: turn a session's drafts into low-priority prefill work on its replica.

    planner = PrefillPlanner(start, ttl_s=30)
    planner.draft(messages_before, draft)   # on every input_text.draft: cheap, coalesces keystrokes
    planner.stop()                          # at submit: cancel the pre-load in flight (its blocks stay cached)

The predictor is the draft itself, cut to its stable part: the words before the last space (the word being typed
will change; text before it rarely does). The target prompt is the session's messages so far plus a user message
holding that stable text, left open (`open_last`: the prompt ends inside the message, so its tokens are a prefix of
the submitted prompt's). The replica's prefix cache does the rest: a later pre-load, or the submit, recomputes
only the blocks after the first changed token.

The prompt may depend on more than the draft's text: with retrieval on, the chunks retrieved for it come first.
`context(text)` (optional) resolves that part for a text, and a Target carries it; the gateway's is the rendered
chunks, so two targets with equal context build their prompts the same way.

A draft whose stable part falls back (a space-less word after the last space, such as "museum?" after "museum ")
while it still begins with the text pre-loaded or in flight changes nothing: that text is still the prompt's prefix.
One pre-load per session is in flight at a time. A draft that extends the target in flight lets it run (typing
goes forward: it computes the new target's prefix, and the next pre-load starts where it ends), unless its
context differs (the retrieved chunks changed with the new words: the prompt in flight is now the wrong one; a
check resolves the newest draft's context while the pre-load runs); a draft that changes it (an edit, a deletion),
or whose context differs, cancels it at once (the blocks it finished stay in the prefix cache).
Bursts of drafts are coalesced (`debounce_s`), and `start` may defer a pre-load (PreloadDeferred: e.g. while
live streams decode, the gateway skips the CPU work of retrieval); it is retried `retry_s` later unless a newer
draft replaced it. Each pre-load carries a deadline `ttl_s` away, after which the replica drops it; the KV it
left is ordinary prefix cache, evicted least recently used.

No torch and no I/O of its own: `start` submits a request and returns a handle (the gateway's Generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from blink.errors import BlinkError

log = logging.getLogger("blink.preload")


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("cancelling a superseded pre-load failed: %s", exc)


Messages = tuple[dict[str, str], ...]


def stable_part(draft: str) -> str:
    """The part of a draft unlikely to change: everything before the word being typed. Trailing whitespace is
    dropped too, since the tokenizer attaches a space to the word after it."""
    cut = len(draft.rstrip()) if draft[-1:].isspace() else max(draft.rfind(" "), draft.rfind("\n"), 0)
    return draft[:cut].rstrip()


@dataclass(frozen=True)
class Target:
    """The prompt a pre-load computes: `messages` then an open user message of `text`, built with `context` (what
    the planner's `context` resolved for `text`; None without one)."""

    messages: Messages
    text: str
    context: Hashable = None

    def as_messages(self) -> Messages:
        return (*self.messages, {"role": "user", "content": self.text})


def _same(target: Target, other: Target | None) -> bool:
    """The same draft (their contexts may not be resolved yet)."""
    return other is not None and target.messages == other.messages and target.text == other.text


def _fell_back(latest: Target, target: Target, draft: str) -> bool:
    """The stable part fell behind a new word (not an edit): the draft still begins with the latest target's text,
    which is still the prompt's prefix, and nothing new is stable yet."""
    same = latest.messages == target.messages
    return same and len(target.text) < len(latest.text) <= len(draft) and draft.startswith(latest.text)


def _extends(target: Target, other: Target) -> bool:
    return target.messages == other.messages and target.text.startswith(other.text)


class PreloadDeferred(Exception):
    """Raised by `start`: not now (the server is busy with live work); the planner retries later."""


class PreloadHandle(Protocol):
    """What `start` returns: a running pre-load (the gateway's Generation fits)."""

    async def collect(self) -> str: ...

    async def cancel(self, reason: str) -> None: ...

    async def close(self) -> None: ...

    @property
    def finished(self) -> Any: ...


@dataclass
class PlannerStats:
    started: int = 0
    completed: int = 0
    superseded: int = 0  # cancelled by a draft that changed the target
    failed: int = 0
    deferred: int = 0
    prompt_tokens: int = 0  # of completed pre-loads
    computed_tokens: int = 0  # of completed pre-loads: prompt tokens not found in the cache
    last_completed: Target | None = None
    last_started: Target | None = None


class PrefillPlanner:
    def __init__(
        self,
        start: Callable[[Target], Awaitable[PreloadHandle]],
        *,
        context: Callable[[str], Awaitable[Hashable]] | None = None,
        min_chars: int = 1,
        debounce_s: float = 0.02,
        retry_s: float = 0.2,
    ) -> None:
        self._start = start
        self._context = context
        self._resolved: tuple[str, Hashable] | None = None  # the last text whose context was resolved, and it
        self._check: asyncio.Task[None] | None = None  # resolving the newest draft's context while one is in flight
        self.min_chars = min_chars
        self.debounce_s = debounce_s
        self.retry_s = retry_s
        self.stats = PlannerStats()
        self._pending: Target | None = None
        self._current: tuple[Target, PreloadHandle | None] | None = None
        self._cancelling = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def draft(self, messages: Messages, draft: str) -> None:
        """The user's unsent text changed. O(1) work: the planner task does the rest."""
        text = stable_part(draft)
        if len(text) < self.min_chars:
            return
        target = Target(messages, text)
        latest = self._pending or (self._current[0] if self._current else self.stats.last_completed)
        if latest is not None and _fell_back(latest, Target(messages, text), draft):
            return
        current = self._current[0] if self._current else self.stats.last_completed
        if _same(target, current) or _same(target, self._pending):
            return
        self._pending = target
        in_flight = self._current[0] if self._current else None
        if in_flight is not None and _extends(target, in_flight):
            # typing went on: the pre-load in flight computes this target's prefix, the next starts after it;
            # unless the new words change the context (retrieval): a check looks while it runs
            if self._context is not None and (self._check is None or self._check.done()):
                self._check = asyncio.get_running_loop().create_task(self._recheck())
        elif self._current is not None and self._current[1] is not None and not self._cancelling:
            self._cancelling = True  # one cancel per pre-load, however many drafts follow
            self.stats.superseded += 1
            task = asyncio.get_running_loop().create_task(self._current[1].cancel("superseded"))
            task.add_done_callback(_log_failure)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def matches(self, messages: Messages, final_text: str, *, completed: bool = True) -> Target | None:
        """The last completed (or, with completed=False, started) pre-load if the submitted prompt (`messages`
        then the user's `final_text`) starts with its prompt, else None: the check behind `preloaded` and
        `preload_predicted` in a response's timings."""
        done = self.stats.last_completed if completed else self.stats.last_started
        if done is not None and done.messages == messages and final_text.startswith(done.text):
            return done
        return None

    async def _resolve(self, target: Target) -> Target:
        if self._context is None:
            return target
        if self._resolved is None or self._resolved[0] != target.text:
            self._resolved = (target.text, await self._context(target.text))
        return replace(target, context=self._resolved[1])

    async def _recheck(self) -> None:
        """While a pre-load runs: resolve the newest draft's context; if it differs from the pre-load's, cancel
        that (the planner task then starts the newest). Coalesced: one check at a time, for the latest draft."""
        while (pending := self._pending) is not None:
            current = self._current
            if current is None or current[1] is None or self._cancelling:
                return
            try:
                resolved = await self._resolve(pending)
            except (PreloadDeferred, BlinkError):
                return  # not now: the planner task resolves it again when it starts the pre-load
            if self._pending is not pending:
                continue  # a newer draft came while retrieving: check that one
            if self._current is current and not self._cancelling and resolved.context != current[0].context:
                self._cancelling = True
                self.stats.superseded += 1
                await current[1].cancel("superseded")
            return

    async def stop(self) -> None:
        """Submit time (or the session ends): cancel the pre-load in flight, drop pending drafts."""
        self._pending = None
        if self._check is not None and not self._check.done():
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError, BlinkError):
                await self._check
        self._check = None
        if self._current is not None and self._current[1] is not None:
            with contextlib.suppress(BlinkError):  # the bus refused it (shutting down): nothing left to stop
                await self._current[1].cancel("superseded")
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self._current = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.debounce_s)  # a burst of keystrokes: take only the last
            self._wake.clear()
            target, self._pending = self._pending, None
            if target is None:
                continue
            self._current, self._cancelling = (target, None), False
            try:
                target = await self._resolve(target)
                self._current = (target, None)
                handle = await self._start(target)
            except PreloadDeferred:
                self.stats.deferred += 1
                self._current = None
                if self._pending is None:
                    self._pending = target
                    await asyncio.sleep(self.retry_s)
                    self._wake.set()
                continue
            except BlinkError as exc:  # not ready, overloaded, too long: pre-loading is best effort
                log.debug("pre-load not started: %s", exc)
                self.stats.failed += 1
                self._current = None
                continue
            self.stats.started += 1
            self.stats.last_started = target
            self._current = (target, handle)
            if self._pending is not None:  # a draft changed it while it was being submitted
                self._cancelling = True
                await handle.cancel("superseded")
            try:
                await handle.collect()
                fin = handle.finished
                if fin is not None and fin.status.value == "stop":
                    self.stats.completed += 1
                    self.stats.prompt_tokens += fin.prompt_tokens
                    self.stats.computed_tokens += fin.prompt_tokens - fin.cached_tokens
                    self.stats.last_completed = target
            finally:
                await handle.close()
                self._current = None
