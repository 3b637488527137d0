"""The transport contract every bus implements (tests/contract/test_bus.py runs it against each).

Guarantees a transport must give:
- `submit` delivers a request to exactly one replica of its model's pool (the one named, when one is), or raises
  Overloaded when the pool's queue is full; the returned stream yields that request's events in order and ends
  after `Finished`.
- `cancel` reaches whichever replica holds (or will take) the request.
- `publish` never blocks on a slow consumer: a response stream is bounded, and when it overflows the consumer
  gets `Finished(status=ERROR, error_code="slow_consumer")` after the events already queued, and `publish`
  returns False from then on (the replica must drop the request). It also returns False once the consumer
  closed the stream, and for a request that was never submitted.
A transport that can be unreachable (Redis) raises NotReady from `submit` and `cancel` (a submit that timed out
may still have been queued: its outcome is unknown), returns False from `publish`, and neither `receive` nor
`heartbeat` raise for it: they log it and return (receive: nothing), so a replica's loop outlives the outage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from blink.bus.messages import GenerateRequest, ReplicaStatus, ResponseEvent, WorkMessage


class ResponseStream(Protocol):
    request_id: str

    def __aiter__(self) -> AsyncIterator[ResponseEvent]: ...

    async def close(self) -> None:
        """Stop receiving; later events for this request are dropped. Idempotent."""
        ...


class Bus(Protocol):
    reclaims: bool  # True when a dead replica's requests are re-delivered to another replica of the pool
    heartbeat_timeout: float  # seconds after its last heartbeat that a replica counts as gone
    step_poll_s: float  # how often a replica looks for work while its engine steps (a newcomer may call it off)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # gateway side
    async def submit(self, request: GenerateRequest, replica_id: str | None = None) -> ResponseStream:
        """`replica_id`: deliver it to that replica of the pool (it holds the prompt's prefix), which takes it
        before the pool's; if that replica stops first, any replica of the pool may take it. None: the pool."""
        ...

    async def cancel(self, request_id: str, model: str) -> None: ...

    def replicas(self) -> list[ReplicaStatus]:
        """Replicas heard from recently (latest heartbeat of each)."""
        ...

    # replica side
    async def receive(self, model: str, replica_id: str, *, wait: float, max_requests: int) -> list[WorkMessage]:
        """Work for this replica: every cancel addressed to it and at most `max_requests` new requests of
        `model`'s pool (the rest stay queued for any replica). Waits up to `wait` seconds when there is none
        (0: return at once)."""
        ...

    async def publish(self, event: ResponseEvent) -> bool: ...

    async def heartbeat(self, status: ReplicaStatus) -> None: ...
