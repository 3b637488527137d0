"""An edge's bus: its own replicas on the in-memory bus, the core's models over the link, behind the one Bus
contract the gateway talks to (bus/base.py). A request for a model this edge serves stays here; any other goes
over the link (edge/link.py), and the core's replicas show among `replicas()` as its status frames report them."""

from __future__ import annotations

from blink.bus.base import Bus, ResponseStream
from blink.bus.messages import GenerateRequest, ReplicaStatus, ResponseEvent, WorkMessage
from blink.edge.link import Link


class EdgeBus:
    reclaims: bool = False

    def __init__(self, local: Bus, link: Link, local_models: set[str]) -> None:
        self.local = local
        self.link = link
        self.local_models = local_models
        self.heartbeat_timeout = local.heartbeat_timeout
        self.step_poll_s = local.step_poll_s

    async def start(self) -> None:
        await self.local.start()
        await self.link.start()

    async def close(self) -> None:
        await self.link.close()
        await self.local.close()

    def remote(self, model: str) -> bool:
        return model not in self.local_models

    async def submit(self, request: GenerateRequest, replica_id: str | None = None) -> ResponseStream:
        if self.remote(request.model):
            return await self.link.submit(request)  # the core picks its replica (affinity travels in the request)
        return await self.local.submit(request, replica_id)

    async def cancel(self, request_id: str, model: str) -> None:
        if self.remote(model):
            await self.link.cancel(request_id)
        else:
            await self.local.cancel(request_id, model)

    def replicas(self) -> list[ReplicaStatus]:
        return [*self.local.replicas(), *self.link.replicas()]

    async def receive(self, model: str, replica_id: str, *, wait: float, max_requests: int) -> list[WorkMessage]:
        return await self.local.receive(model, replica_id, wait=wait, max_requests=max_requests)

    async def publish(self, event: ResponseEvent) -> bool:
        return await self.local.publish(event)

    async def heartbeat(self, status: ReplicaStatus) -> None:
        await self.local.heartbeat(status)
