"""A request inside the engine, with its sampling parameters and lifecycle."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from blink.engine.kv_cache import UNSALTED, CacheSalt

SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int | None = 256  # None: up to the end of the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")

    @property
    def greedy(self) -> bool:
        # below SAMPLING_EPS the distribution is argmax's to within float precision (vLLM's rule too), and
        # dividing logits by such a temperature would overflow
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # a pre-decode that decoded its tokens: it holds its KV blocks, runs no steps, until adopted
    FINISHED = "finished"


_TRANSITIONS = {
    SeqStatus.WAITING: {SeqStatus.RUNNING, SeqStatus.FINISHED},
    SeqStatus.RUNNING: {SeqStatus.WAITING, SeqStatus.PARKED, SeqStatus.FINISHED},  # back to waiting: preempted
    SeqStatus.PARKED: {SeqStatus.RUNNING, SeqStatus.FINISHED},
    SeqStatus.FINISHED: set(),
}


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token (or, decided by the caller, a stop string)
    LENGTH = "length"  # max_tokens or the model's context
    ABORTED = "aborted"
    EXPIRED = "expired"  # its deadline passed before it finished
    PREFILLED = "prefilled"  # a prefill-only sequence: its prompt's K/V are computed (and cached), no token


@dataclass(eq=False)  # identity: two requests are never "equal"
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    priority: int = 0  # lower runs first: live requests 0, background prefill work above
    prefill_only: bool = False  # compute the prompt's K/V for the prefix cache, sample nothing (pre-loading)
    park_after: int = 0  # a pre-decode: park once it has this many output tokens (0: never)
    reserved: bool = False  # parked and being adopted: the schedule neither expires nor evicts it
    deadline: float | None = None  # time.monotonic() after which nobody waits for it
    salt: CacheSalt = UNSALTED  # its tenant and prefix-cache partition (BlockManager.salt)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    spec_proposed: int = 0  # speculative decoding: guesses proposed for it, and accepted
    spec_accepted: int = 0
    spec_successes: float = 0.0  # recent kept guesses and trials, for the speculation policy's estimate
    spec_trials: float = 0.0
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    max_tokens: int = 1 << 30  # the most tokens it may generate (params.max_tokens, resolved against the context)
    prediction: list[int] = field(default_factory=list)  # what the answer is expected to copy (Predicted Outputs)
    prediction_at: int = 0  # where the answer stands in it (speculator.prediction_lookup's hint)
    prediction_accepted: int = 0  # the prediction's tokens verified and kept, and verified and rejected
    prediction_rejected: int = 0

    def set_status(self, new: SeqStatus) -> None:
        if new not in _TRANSITIONS[self.status]:
            raise RuntimeError(f"{self.request_id}: illegal transition {self.status.value} -> {new.value}")
        self.status = new

    @property
    def tenant(self) -> str | None:
        """Who it belongs to: its share of the batch (the scheduler's fairness) and its prefix-cache partition."""
        return self.salt.tenant

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int | None  # None: finished without a new token (expired)
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    queue_s: float  # arrival -> first scheduled
    prefill_s: float  # first scheduled -> first token
    spec_proposed: int = 0  # speculative decoding: guesses proposed for this request so far, and accepted
    spec_accepted: int = 0
    prediction_accepted: int = 0  # of those, the request's own prediction's (Predicted Outputs): kept, rejected
    prediction_rejected: int = 0
