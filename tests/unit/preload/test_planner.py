"""The prefill planner's logic with a fake `start` (the e2e tests run it against a real server)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from blink.preload.planner import PrefillPlanner, PreloadDeferred, Target, stable_part


def test_the_stable_part_drops_the_word_being_typed() -> None:
    assert stable_part("What is the capi") == "What is the"
    assert stable_part("What is the capital ") == "What is the capital"
    assert stable_part("What") == ""
    assert stable_part("") == ""
    assert stable_part("line one\nline tw") == "line one\nline"
    assert stable_part("line one\ntw") == "line one"


@dataclass
class FakeStatus:
    value: str


@dataclass
class FakeFinished:
    status: FakeStatus
    prompt_tokens: int = 40
    cached_tokens: int = 8


@dataclass
class FakeHandle:
    target: Target
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    finished: Any = None

    async def collect(self) -> str:
        await self.done.wait()
        return ""

    async def cancel(self, reason: str) -> None:
        self.cancelled += 1
        self.finished = FakeFinished(FakeStatus("cancelled"))
        self.done.set()

    async def close(self) -> None:
        pass

    def complete(self) -> None:
        self.finished = FakeFinished(FakeStatus("stop"))
        self.done.set()


class Starts:
    def __init__(self, defer: int = 0) -> None:
        self.handles: list[FakeHandle] = []
        self.defer = defer

    async def __call__(self, target: Target) -> FakeHandle:
        if self.defer:
            self.defer -= 1
            raise PreloadDeferred("busy")
        self.handles.append(FakeHandle(target))
        return self.handles[-1]


async def settle() -> None:
    await asyncio.sleep(0.05)


def test_drafts_are_coalesced_and_typing_on_waits_for_the_preload_in_flight() -> None:
    async def main() -> None:
        starts = Starts()
        planner = PrefillPlanner(starts, debounce_s=0.01)
        for i in range(1, 30):  # a keystroke burst: one pre-load for the last stable text
            planner.draft((), "Tell me about the harbour museum"[:i])
        await settle()
        assert [h.target.text for h in starts.handles] == ["Tell me about the harbour"]
        planner.draft((), "Tell me about the harbour museum and ")  # extends: the one in flight goes on
        await settle()
        assert starts.handles[0].cancelled == 0 and len(starts.handles) == 1
        starts.handles[0].complete()
        await settle()
        assert [h.target.text for h in starts.handles][-1] == "Tell me about the harbour museum and"
        starts.handles[-1].complete()
        await settle()
        assert planner.matches((), "Tell me about the harbour museum and its history?") is not None
        assert planner.matches((), "Tell me about the river") is None
        assert planner.stats.completed == 2
        await planner.stop()

    asyncio.run(main())


def test_an_edit_cancels_the_preload_in_flight_once() -> None:
    async def main() -> None:
        starts = Starts()
        planner = PrefillPlanner(starts, debounce_s=0.01)
        planner.draft((), "What time does the museum ")
        await settle()
        first = starts.handles[0]
        for text in ("Where is the ", "Where is the cafe ", "Where is the shop "):
            planner.draft((), text)
        await settle()
        assert first.cancelled == 1  # however many drafts followed
        assert starts.handles[-1].target.text == "Where is the shop"
        await planner.stop()
        assert starts.handles[-1].cancelled == 1  # submit stops the one in flight

    asyncio.run(main())


def test_typing_the_next_word_leaves_the_preload_of_the_words_before_it_running() -> None:
    async def main() -> None:
        starts = Starts()
        planner = PrefillPlanner(starts, debounce_s=0.01)
        planner.draft((), "Where is the museum ")
        await settle()
        first = starts.handles[0]
        assert first.target.text == "Where is the museum"
        for text in ("Where is the museum?", "Where is the museum?!"):  # the stable part falls back a word
            planner.draft((), text)
        await settle()
        assert first.cancelled == 0 and len(starts.handles) == 1  # what it computes is still the prompt's prefix
        first.complete()
        await settle()
        assert len(starts.handles) == 1  # nothing new to pre-load
        assert planner.matches((), "Where is the museum?!") is not None
        planner.draft((), "Where is the mu")  # an edit (backspaces) still replaces it
        await settle()
        assert [h.target.text for h in starts.handles] == ["Where is the museum", "Where is the"]
        await planner.stop()

    asyncio.run(main())


def test_a_deferred_preload_is_retried() -> None:
    async def main() -> None:
        starts = Starts(defer=2)
        planner = PrefillPlanner(starts, debounce_s=0.01, retry_s=0.02)
        planner.draft((), "Who painted the oldest ")
        await asyncio.sleep(0.2)
        assert planner.stats.deferred == 2 and [h.target.text for h in starts.handles] == ["Who painted the oldest"]
        await planner.stop()

    asyncio.run(main())


def test_typing_that_changes_the_retrieved_context_replaces_the_preload_in_flight() -> None:
    async def main() -> None:
        lookups: list[str] = []

        async def context(text: str) -> str:  # retrieval's stand-in: the chunk a text would retrieve
            lookups.append(text)
            await asyncio.sleep(0.001)
            return "bridge chunk" if "bridge" in text else "town chunk"

        starts = Starts()
        planner = PrefillPlanner(starts, context=context, debounce_s=0.01)
        planner.draft((), "When was the town ")
        await settle()
        first = starts.handles[0]
        assert (first.target.text, first.target.context) == ("When was the town", "town chunk")
        planner.draft((), "When was the town hall ")  # extends, same context: the one in flight goes on
        await settle()
        assert first.cancelled == 0 and len(starts.handles) == 1
        planner.draft((), "When was the town hall bridge ")  # extends, but the context changed: replaced at once
        await settle()
        assert first.cancelled == 1
        second = starts.handles[-1]
        assert (second.target.text, second.target.context) == ("When was the town hall bridge", "bridge chunk")
        second.complete()
        await settle()
        done = planner.matches((), "When was the town hall bridge built?")
        assert done is not None and done.context == "bridge chunk"  # the gateway compares it with the final one's
        assert lookups.count("When was the town hall bridge") == 1  # resolved once, by the check, reused to start
        await planner.stop()

    asyncio.run(main())
