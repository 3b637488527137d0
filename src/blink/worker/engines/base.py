"""The protocol between a replica and an engine that streams (an upstream server, vLLM's AsyncLLM): one request in,
text deltas out, then its end. Cancel is closing the stream; a pre-load is a request with `prefill_only` whose
stream ends without text once the engine holds its prefix."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from blink.bus.messages import FinishStatus, GenerateRequest


@dataclass(frozen=True)
class Delta:
    """New text of the answer, and how many tokens the answer has so far (0 where the engine does not say)."""

    text: str
    completion_tokens: int = 0


@dataclass(frozen=True)
class End:
    """How a request ended, with the engine's own usage figures (0 where it gives none)."""

    status: FinishStatus
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    error_param: str | None = None


@dataclass(frozen=True)
class EngineLoad:
    """What a heartbeat says of the engine: requests it runs and holds back, the context it takes, its KV cache
    (blocks held by requests, of all), and its speculative decoding (guessed tokens verified, and accepted)."""

    running: int = 0
    waiting: int = 0
    max_model_len: int = 0
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0
    speculative: str = "off"  # the engine's speculative decoding, as the heartbeat names it


class StreamingEngine(Protocol):
    name: str  # what `--engine` calls it

    async def start(self) -> None:
        """Return once the engine answers (loaded and warm); raise if it cannot."""

    async def close(self) -> None: ...

    def stream(self, request: GenerateRequest) -> AsyncGenerator[Delta | End, None]:
        """The request's deltas, then exactly one End (closing it early cancels the request). Bad input ends as
        End(ERROR, error_code=...) from the engine's own answer, never as an exception."""
        ...

    async def healthy(self) -> bool:
        """Whether the engine answers now (heartbeats turn a replica whose engine does not into one that
        takes no work)."""
        ...

    def load(self) -> EngineLoad: ...
