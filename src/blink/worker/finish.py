"""What a replica reports of a request it ran: its timings (in its Finished) and its trace spans."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from blink.bus.messages import GenerateRequest
from blink.engine.sequence import StepOutput
from blink.telemetry import tracing
from blink.worker.output import TextOutput


@dataclass
class Active:
    """A request the replica's engine runs."""

    request: GenerateRequest
    output: TextOutput
    events: int = 0
    first_token: float | None = None
    marks: dict[str, float] | None = None  # unix times for the trace (received, queued_s, first token, ...)
    predecoded: int = 0  # it adopted a pre-decode of this many tokens (worker/predecode.py)
    prompt_tokens: int = 0  # its whole prompt (a prefill-only request computes only its whole blocks)


def timings(active: Active, out: StepOutput) -> dict[str, Any]:
    decode_s = time.monotonic() - active.first_token if active.first_token else 0.0
    return {
        "queue_ms": round(out.queue_s * 1000, 3),
        "prefill_ms": round(out.prefill_s * 1000, 3),
        "decode_ms": round(decode_s * 1000, 3),
        "speculative": {"proposed": out.spec_proposed, "accepted": out.spec_accepted},
    }


def trace(active: Active, out: StepOutput, ended: float) -> None:
    """This replica's spans of a finished request (telemetry/tracing.py: they tile its time here). Decode ends
    at `ended`, the time its Finished carries, so a last step that adds no text (a stop token) is decode's."""
    m, req = active.marks, active.request
    assert m is not None and "first_token" in m
    scheduled = m["received"] + m["queue_s"]
    first_sent = m.get("first_sent", m["first_token"])
    spans: list[tuple[str, float, float, dict[str, Any]]] = [
        ("replica.queue", m["received"], scheduled, {"blink.replica.waiting_s": m["queue_s"]}),
        (
            "engine.prefill",
            scheduled,
            m["first_token"],
            {
                "gen_ai.usage.input_tokens": out.prompt_tokens,
                "blink.cached_tokens": out.cached_tokens,
                "blink.computed_tokens": out.prompt_tokens - out.cached_tokens,
            },
        ),
        ("first_token", m["first_token"], first_sent, {}),
        (
            "engine.decode",
            first_sent,
            ended,
            {
                "gen_ai.usage.output_tokens": out.completion_tokens,
                "blink.speculative.proposed": out.spec_proposed,
                "blink.speculative.accepted": out.spec_accepted,
            },
        ),
    ]
    if req.submitted is not None:
        spans.insert(0, ("bus.publish", req.submitted, m["received"], {}))
    tracing.replica_spans(req.traceparent, spans)
