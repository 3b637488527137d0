"""Continuing a response on another replica after the one serving it died (a bus that `reclaims`).

The new replica starts the request again from its prompt. With greedy decoding it regenerates the same text, so
the gateway replays nothing the client already has: `Replay` swallows the regenerated text up to what was
delivered, checks that it is the same, and passes on only what is new. The client never sees text twice; if the
regenerated text differs (sampling, or a different model build), the response ends with an error instead of a
silently spliced answer.
"""

from __future__ import annotations


class ReplayMismatch(Exception):
    """The regenerated text differs from what the client already received."""


class Replay:
    def __init__(self, delivered: str) -> None:
        self._delivered = delivered
        self._seen = 0  # characters of `delivered` regenerated so far

    @property
    def done(self) -> bool:
        return self._seen >= len(self._delivered)

    def feed(self, text: str) -> str:
        """The part of `text` (the next regenerated piece) the client has not seen; "" while still replaying.
        Raises ReplayMismatch when `text` disagrees with the delivered text."""
        expected = self._delivered[self._seen : self._seen + len(text)]
        if not text.startswith(expected):
            raise ReplayMismatch(f"regenerated {text!r} where the client had {expected!r}")
        self._seen += len(expected)
        return text[len(expected) :]
