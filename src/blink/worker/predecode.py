"""A replica's pre-decodes: the first tokens of an answer decoded before it is asked for (engine: llm_engine.py).

    gateway ──GenerateRequest(predecode=N)──▶ replica: decodes N tokens at background priority, parks; Finished
    gateway ──GenerateRequest(adopt=<its id>)──▶ replica: checks it is the same question (`adoptable`), then
              streams the held tokens at once and goes on decoding that sequence as the live request

A pre-decode's outputs are held here (`Held`), never sent, until a request adopts it; abandoned (a newer one of
the session, a cancel, its deadline), they were wasted compute and nothing else. One per session: a newer one
replaces the older. A request adopts only a pre-decode of its own tenant and session whose prompt tokens and
sampling (max_tokens aside) are its own, and never with a prediction: so the adopted answer is the one its own
run gives (greedy and seeded sampling: the same tokens; unseeded: a sample of the same distribution).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from blink.bus.messages import GenerateRequest
from blink.engine.sequence import StepOutput


@dataclass
class Held:
    """A pre-decode's state on the replica: its prompt and the outputs the engine gave it."""

    request: GenerateRequest
    prompt: list[int]
    outputs: list[StepOutput] = field(default_factory=list)
    announced: bool = False  # its Finished went to the gateway (it has its tokens, or ended)
    ended: bool = False  # the engine finished it (a stop token within its tokens): it holds nothing there

    @property
    def tokens(self) -> int:
        return len(self.outputs)  # each held output is a token (one without a token ends it instead)

    def ready(self) -> bool:
        """It has its tokens (or ended before): time to tell the gateway."""
        return self.ended or self.tokens >= self.request.predecode


def adoptable(held: Held, req: GenerateRequest, prompt: list[int]) -> bool:
    """Whether `req` asks exactly what `held` computed (see the module docstring)."""
    pre = held.request
    return (
        pre.tenant == req.tenant
        and pre.session_id == req.session_id
        and pre.model == req.model
        and req.prediction is None
        and not req.prefill_only
        and req.predecode == 0
        and dataclasses.replace(pre.sampling, max_tokens=None, stop=())
        == dataclasses.replace(req.sampling, max_tokens=None, stop=())
        and held.prompt == prompt
        and (req.sampling.max_tokens is None or req.sampling.max_tokens > held.tokens)
    )


class Predecodes:
    """The held pre-decodes, by request id, and each session's latest."""

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self._of_session: dict[str, str] = {}

    def add(self, req: GenerateRequest, prompt: list[int]) -> str | None:
        """Hold a new pre-decode; returns the request id of the one it replaces (same session), if any."""
        self.held[req.request_id] = Held(req, prompt)
        if req.session_id is None:
            return None
        previous = self._of_session.get(req.session_id)
        self._of_session[req.session_id] = req.request_id
        return previous if previous in self.held else None

    def forget(self, request_id: str) -> Held | None:
        held = self.held.pop(request_id, None)
        session = held.request.session_id if held is not None else None
        if session is not None and self._of_session.get(session) == request_id:
            del self._of_session[session]
        return held

    def stale(self) -> list[str]:
        """Pre-decodes that ended in the engine (held here only) and whose deadline passed: nobody adopts them."""
        now = time.time()
        return [i for i, h in self.held.items() if h.ended and h.request.deadline and h.request.deadline < now]
