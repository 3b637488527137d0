"""The predecoder's logic with a fake `start` (tests/e2e/test_predecode.py runs it against a real server)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from blink.preload import predecode as pd
from blink.preload.predecode import Predecoder


@dataclass
class Status:
    value: str


@dataclass
class Fin:
    status: Status
    completion_tokens: int


@dataclass
class Handle:
    tokens: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished: Any = None

    async def collect(self) -> str:
        await self.done.wait()
        return ""

    async def cancel(self, reason: str) -> None:
        raise AssertionError("the predecoder cancels by request id")

    async def close(self) -> None:
        pass

    def end(self, status: str = "stop", tokens: int | None = None) -> None:
        self.finished = Fin(Status(status), self.tokens if tokens is None else tokens)
        self.done.set()


class Fake:
    def __init__(self) -> None:
        self.started: list[tuple[Any, str, int, Handle]] = []
        self.cancelled: list[str] = []
        self.outcomes: list[tuple[str, int]] = []

    async def start(self, messages: Any, text: str, tokens: int) -> tuple[Handle, Any, str]:
        handle = Handle(tokens)
        self.started.append((messages, text, tokens, handle))
        return handle, ("key", messages, text), f"pre-{len(self.started)}"

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def predecoder(self, **kwargs: Any) -> Predecoder:
        return Predecoder(self.start, self.cancel, on_outcome=lambda o, n: self.outcomes.append((o, n)), **kwargs)


@pytest.fixture(autouse=True)
def no_rhythm(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "RHYTHM", 0.0)  # these tests type faster than anyone: the wait is idle_s alone
    monkeypatch.setattr(pd, "SENTENCE_RHYTHM", 0.0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_still_draft_is_pre_decoded_once_and_taken_by_its_submit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "IDLE_S", 0.01)
    monkeypatch.setattr(pd, "MIN_IDLE_S", 0.001)

    async def main() -> None:
        fake = Fake()
        p = fake.predecoder()
        for text in ("Wh", "What ti", "What time is it?"):
            p.draft((), text)
        await asyncio.sleep(0.05)
        assert [s[1] for s in fake.started] == ["What time is it?"]  # only the still one
        p.draft((), "What time is it?")  # the same draft again changes nothing
        fake.started[0][3].end(tokens=4)
        await settle()
        assert p.take(("key", (), "What time is it?")) == "pre-1"
        await settle()
        assert fake.cancelled == [] and fake.outcomes == [("adopted", 4)]
        assert p.tokens == pd.TOKENS + 2 and p.idle_s < 0.01  # it paid: more tokens, sooner

    asyncio.run(main())


def test_typing_on_abandons_it_and_counts_its_tokens_as_wasted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "IDLE_S", 0.01)

    async def main() -> None:
        fake = Fake()
        p = fake.predecoder()
        p.draft((), "What time")
        await asyncio.sleep(0.05)
        p.draft((), "What time is")  # before it ended: the replica reports what it had decoded
        await settle()
        assert fake.cancelled == ["pre-1"] and fake.outcomes == []
        fake.started[0][3].end("cancelled", tokens=2)
        await settle()
        assert fake.outcomes == [("wasted", 2)]
        assert p.tokens == pd.TOKENS // 2 and p.idle_s > 0.01  # it did not pay: fewer tokens, later
        assert p.take(("key", (), "What time is")) is None  # the new draft's timer had not fired yet
        await asyncio.sleep(0.05)
        assert len(fake.started) == 1  # the submit stopped the timer

    asyncio.run(main())


def test_a_submit_of_another_question_or_a_failed_one_takes_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "IDLE_S", 0.01)

    async def main() -> None:
        fake = Fake()
        p = fake.predecoder()
        p.draft((), "Hello")
        await asyncio.sleep(0.05)
        fake.started[0][3].end()
        assert p.take(("key", (), "Hello there")) is None
        await settle()
        assert fake.cancelled == ["pre-1"] and fake.outcomes == [("wasted", pd.TOKENS)]
        p.draft((), "Hi")
        await asyncio.sleep(0.05)
        fake.started[1][3].end("cancelled", tokens=0)  # e.g. an upstream engine, which cannot pre-decode
        assert p.take(("key", (), "Hi")) is None

    asyncio.run(main())


def test_the_adaptive_knobs_stay_in_their_bounds(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "IDLE_S", 0.001)
    monkeypatch.setattr(pd, "MAX_IDLE_S", 0.02)

    async def main() -> None:
        fake = Fake()
        p = fake.predecoder(max_tokens=6)
        for i in range(20):
            p.draft((), f"question {i}")
            await asyncio.sleep(p.idle_s + 0.01)
            p.draft((), f"question {i} more")  # abandoned each time
        assert p.tokens == pd.MIN_TOKENS and p.idle_s == pd.MAX_IDLE_S
        await p.stop()

    asyncio.run(main())


def test_off_when_max_tokens_is_zero() -> None:
    async def main() -> None:
        fake = Fake()
        p = fake.predecoder(max_tokens=0)
        p.draft((), "Hello")
        await asyncio.sleep(0.4)
        assert fake.started == []

    asyncio.run(main())


def test_a_slow_typist_waits_longer_than_a_fast_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "RHYTHM", 4.0)

    async def typed(interval: float) -> float:
        p = Fake().predecoder()
        for i in range(6):
            p.draft((), "x" * (i + 1))
            await asyncio.sleep(interval)
        await p.stop()
        return p.wait_s("xxxxxx")

    async def main() -> None:
        fast, slow = await typed(0.01), await typed(0.2)
        assert fast == pd.IDLE_S  # the floor
        assert 0.7 < slow <= pd.MAX_IDLE_S  # four of its intervals

    asyncio.run(main())


def test_a_sentence_end_waits_less_and_a_trailing_space_waits_longest(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pd, "RHYTHM", 4.0)
    monkeypatch.setattr(pd, "SENTENCE_RHYTHM", 1.5)
    p = Fake().predecoder()
    assert p.wait_s("What time is it?") == max(pd.IDLE_S, pd.SENTENCE_RHYTHM * pd.PRIOR_IKI_S)
    assert p.wait_s("What time is it") == max(pd.IDLE_S, pd.RHYTHM * pd.PRIOR_IKI_S)
    assert p.wait_s("What time is ") == pd.MAX_IDLE_S


def test_with_room_to_spare_a_sentence_end_is_pre_decoded_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    busy = [False]
    p = Fake().predecoder(spare=lambda: not busy[0])
    assert p.wait_s("What time is it?") == pd.MIN_IDLE_S
    assert p.wait_s("What time is it") == max(pd.IDLE_S, pd.RHYTHM * pd.PRIOR_IKI_S)  # mid-sentence: as before
    busy[0] = True  # live streams: the usual wait, not to take decode from them on a guess
    assert p.wait_s("What time is it?") == max(pd.IDLE_S, pd.SENTENCE_RHYTHM * pd.PRIOR_IKI_S) > pd.MIN_IDLE_S
