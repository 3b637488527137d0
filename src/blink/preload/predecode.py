"""Pre-decode: when a session's draft has been still for a moment, decode the first tokens of its answer, so
that a submit of that text sends them at once (the replica's side: worker/predecode.py).

    predecoder = Predecoder(start, cancel)
    predecoder.draft(messages, draft)   # each input_text.draft: re-arms the idle timer, abandons a stale one
    predecoder.take(key)                # at response.create: the request id to adopt, or None
    await predecoder.stop()             # the session ends

A pre-decode starts a wait (below) after the last draft if no other draft came, for the whole draft as typed
(not its stable part: a user who stopped typing usually submits what they typed). `start(messages, text,
tokens)` builds the request and returns its handle and its key: what the answer is to (the gateway's: the
prompt's messages, model and sampling), so `take` adopts it only for the same question. A draft with other
text abandons it (the replica frees it; its decoded tokens were wasted), as does `take` with another key, or
`stop`.

Both knobs adapt per session, to keep wasted decode small against what is used:
- the wait: `idle_s` (from IDLE_S), or RHYTHM times the session's median interval between drafts (its user's
  typing speed: a slow typist's every key would otherwise look like a pause; intervals over MAX_IDLE_S are pauses,
  not typing; PRIOR_IKI_S, the mean of Dhakal et al. 2018 (bench/typing.py), until RHYTHM_MIN_SAMPLES are in),
  whichever is longer, at most MAX_IDLE_S. A draft that ends a sentence (?, ., !) waits SENTENCE_RHYTHM times
  instead: a question mark is a strong sign of a submit. While serving has room (`spare()`: no live response
  streams), such a draft waits only MIN_IDLE_S: a decode nobody waits for costs no one anything then, and the
  pause before Enter is often shorter than the user's rhythm allows for (measured in the browser:
  benchmarks/browser_typing.py). One that ends in whitespace waits MAX_IDLE_S: the
  next word is coming. A pause the user then typed on after grows `idle_s` by 1.25x (up to MAX_IDLE_S); one
  that ended in a submit shrinks it by 0.9x (down to MIN_IDLE_S). On keystroke replays with the published typing
  statistics (`blink bench --typing`) this kept wasted tokens below the adopted ones (see docs/predecode.md).
- `tokens` (from TOKENS): halved on abandon (down to MIN_TOKENS), plus 2 on adopt (up to `max_tokens`). So an
  abandon costs what about two adopts gain, and the wasted tokens stay near the used ones or below.

No torch and no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from blink.errors import BlinkError
from blink.preload.planner import Messages, PreloadHandle

log = logging.getLogger("blink.preload")

IDLE_S, MIN_IDLE_S, MAX_IDLE_S = 0.3, 0.15, 1.5
RHYTHM, SENTENCE_RHYTHM, RHYTHM_SAMPLES, RHYTHM_MIN_SAMPLES = 4.0, 1.5, 32, 3
PRIOR_IKI_S = 0.239
TOKENS, MIN_TOKENS = 4, 2


@dataclass
class PredecodeStats:
    started: int = 0
    adopted: int = 0
    abandoned: int = 0
    failed: int = 0
    adopted_tokens: int = 0  # pre-decoded tokens sent at a submit
    wasted_tokens: int = 0  # pre-decoded tokens of abandoned pre-decodes


@dataclass
class _Running:
    messages: Messages
    text: str
    key: Hashable
    handle: PreloadHandle
    request_id: str
    tokens: int  # asked for
    outcome: str = ""  # "adopted" or "wasted", once decided
    settled: bool = False  # counted (once its Finished says how many tokens it decoded)


Start = Callable[[Messages, str, int], Awaitable[tuple[PreloadHandle, Hashable, str]]]


class Predecoder:
    def __init__(
        self,
        start: Start,
        cancel: Callable[[str], Coroutine[Any, Any, None]],
        *,
        max_tokens: int = 8,
        on_outcome: Callable[[str, int], None] | None = None,
        spare: Callable[[], bool] | None = None,
    ) -> None:
        """`start(messages, text, tokens)` -> (handle, key, request id); `cancel(request id)` frees one the
        replica holds (after its Finished, when the handle can no longer cancel it); `on_outcome(outcome, tokens)`
        hears "adopted" and "wasted" tokens (metrics); `spare()`: whether serving has room now (None: never)."""
        self._start, self._cancel, self._on_outcome, self._spare = start, cancel, on_outcome, spare
        self.max_tokens = max_tokens
        self.idle_s = IDLE_S
        self.tokens = min(TOKENS, max_tokens)
        self.stats = PredecodeStats()
        self._draft: tuple[Messages, str] | None = None
        self._last_draft_at: float | None = None
        self._intervals: deque[float] = deque(maxlen=RHYTHM_SAMPLES)  # between drafts, while typing
        self._timer: asyncio.Task[None] | None = None
        self._running: _Running | None = None
        self._watching: set[asyncio.Task[None]] = set()

    def draft(self, messages: Messages, draft: str) -> None:
        """The user's unsent text changed (O(1): a timer does the rest)."""
        if self.max_tokens < 1:
            return
        now = time.monotonic()
        if self._last_draft_at is not None and now - self._last_draft_at < MAX_IDLE_S:
            self._intervals.append(now - self._last_draft_at)
        self._last_draft_at = now
        new = (messages, draft) if draft.strip() else None
        if new == self._draft:
            return  # the same text (a draft sent twice): the timer or the pre-decode goes on
        self._draft = new
        current, self._running = self._running, None
        if current is not None:
            self._abandoned(current)
        if self._timer is not None:
            self._timer.cancel()
        if new is not None:
            self._timer = asyncio.get_running_loop().create_task(self._after_idle(new))

    def take(self, key: Hashable) -> str | None:
        """At response.create: the pre-decode to adopt if it answers `key`, else None (and any other one is
        abandoned). The timer stops either way: the draft was submitted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current, self._running = self._running, None
        if current is None:
            return None
        if current.key != key or self._failed(current):
            self._abandoned(current)
            return None
        self.stats.adopted += 1
        current.outcome = "adopted"
        self._settle(current)
        self.idle_s = max(MIN_IDLE_S, self.idle_s * 0.9)
        self.tokens = min(self.max_tokens, self.tokens + 2)
        return current.request_id

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        current, self._running = self._running, None
        if current is not None:
            self._abandoned(current, adapt=False)

    def wait_s(self, draft: str = "") -> float:
        """How long `draft` must stay still before it is pre-decoded (see the module docstring)."""
        if draft[-1:].isspace():
            return MAX_IDLE_S
        sentence = draft.rstrip()[-1:] in ("?", ".", "!")
        if sentence and self._spare is not None and self._spare():
            return MIN_IDLE_S
        iki = statistics.median(self._intervals) if len(self._intervals) >= RHYTHM_MIN_SAMPLES else PRIOR_IKI_S
        rhythm = (SENTENCE_RHYTHM if sentence else RHYTHM) * iki
        return min(MAX_IDLE_S, max(self.idle_s, rhythm))

    async def _after_idle(self, draft: tuple[Messages, str]) -> None:
        await asyncio.sleep(self.wait_s(draft[1]))
        if self._draft != draft or self._running is not None:
            return
        messages, text = draft
        try:
            handle, key, request_id = await self._start(messages, text, self.tokens)
        except BlinkError as exc:  # not ready, overloaded, too long: best effort
            log.debug("pre-decode not started: %s", exc)
            self.stats.failed += 1
            return
        self.stats.started += 1
        running = _Running(messages, text, key, handle, request_id, self.tokens)
        if self._draft != draft:  # a draft came while it was being submitted
            self._abandoned(running)
            return
        self._running = running
        watch = asyncio.get_running_loop().create_task(self._watch(running))
        self._watching.add(watch)  # until its Finished (at its tokens, adoption or cancel), never cancelled:
        watch.add_done_callback(self._watching.discard)  # closing a running handle would cancel the request

    async def _watch(self, running: _Running) -> None:
        try:
            await running.handle.collect()
        except BlinkError as exc:
            log.debug("pre-decode failed: %s", exc)
        finally:
            await running.handle.close()
        self._settle(running)

    def _settle(self, running: _Running) -> None:
        """Count its tokens as adopted or wasted, once both its outcome and its Finished are known."""
        fin = running.handle.finished
        if running.settled or not running.outcome or fin is None:
            return
        running.settled = True
        tokens = int(fin.completion_tokens)
        if running.outcome == "adopted":
            self.stats.adopted_tokens += tokens
        else:
            self.stats.wasted_tokens += tokens
        if self._on_outcome is not None:
            self._on_outcome(running.outcome, tokens)

    @staticmethod
    def _failed(running: _Running) -> bool:
        fin = running.handle.finished
        return fin is not None and fin.status.value not in ("stop", "length")

    def _abandoned(self, running: _Running, *, adapt: bool = True) -> None:
        self.stats.abandoned += 1
        running.outcome = "wasted"
        self._settle(running)
        if adapt:
            self.idle_s = min(MAX_IDLE_S, self.idle_s * 1.25)
            self.tokens = max(min(MIN_TOKENS, self.max_tokens), self.tokens // 2)
        task = asyncio.get_running_loop().create_task(self._cancel(running.request_id))
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("cancelling an abandoned pre-decode failed: %s", exc)
