"""Per-request text output: incremental detokenization plus stop strings.

Text that could still turn out to be the start of a stop string is held back until it cannot; a stop string
itself never reaches the client.
"""

from __future__ import annotations

from blink.models.tokenizer import IncrementalDetokenizer, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._text = ""
        self._sent = 0
        self.stopped = False  # a stop string was produced

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to send ('' if none)."""
        if self.stopped:
            return ""
        self._text += self._detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: return what was held back."""
        if self.stopped:
            return ""
        self._text += self._detok.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text, start = self._text, self._sent
        for stop in self._stop:
            hit = text.find(stop, max(0, start - len(stop) + 1))
            if hit != -1:
                self.stopped = True
                self._sent = hit
                return text[start:hit]
        end = len(text) if final else len(text) - self._held_back(text)
        end = max(end, start)
        self._sent = end
        return text[start:end]

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
