"""Replay after failover: regenerated text up to what the client had is swallowed, the rest passes, a difference
is an error."""

from __future__ import annotations

import pytest

from blink.gateway.failover import Replay, ReplayMismatch


def test_regenerated_text_is_swallowed_up_to_the_delivered_text_however_it_is_split() -> None:
    replay = Replay("Hello, wor")
    assert [replay.feed(t) for t in ["Hel", "lo", ", w"]] == ["", "", ""]
    assert not replay.done
    assert replay.feed("orld!") == "ld!"  # the piece crossing the boundary passes its new part on
    assert replay.done
    assert replay.feed(" Bye") == " Bye"


def test_nothing_delivered_passes_everything() -> None:
    replay = Replay("")
    assert replay.done and replay.feed("abc") == "abc"


@pytest.mark.parametrize("pieces", [["Hello", ", there"], ["Help"], ["x"]])
def test_a_different_regeneration_is_refused(pieces: list[str]) -> None:
    replay = Replay("Hello, world")
    with pytest.raises(ReplayMismatch):
        for piece in pieces:
            replay.feed(piece)
