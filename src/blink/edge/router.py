"""The edge's router: the gateway asks it where each request goes after a semantic-cache miss (service.Router),
and it answers from the routing table (policy.py), the edge's replicas' heartbeats and the link's state."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blink.bus.messages import GenerateRequest, ReplicaState
from blink.edge.bus import EdgeBus
from blink.edge.link import Link
from blink.edge.policy import AUTO, DEFAULT_CONTEXT, Decision, Rule, features_of, ready_wait


@dataclasses.dataclass
class _Core:
    link: Link

    @property
    def up(self) -> bool:
        return self.link.connected

    @property
    def rtt_s(self) -> float | None:
        return self.link.rtt_s

    @property
    def wait_s(self) -> float:
        waits = [r.queue_wait_s for r in self.link.replicas() if r.state is ReplicaState.READY]
        return min(waits) if waits else 0.0


class Router:
    def __init__(self, bus: EdgeBus, local_model: str, rules: tuple[Rule, ...], core_model: str = "") -> None:
        self.bus = bus
        self.local_model = local_model
        self.rules = rules
        self.core_model = core_model  # "" : the first model the core lists
        self._core = _Core(bus.link)

    def decide(self, request: GenerateRequest) -> Decision:
        if request.model != AUTO:
            return Decision(request.model, "core" if self.bus.remote(request.model) else "edge")
        wait, context = ready_wait(self.bus.local.replicas(), self.local_model)
        features = features_of(
            request, context=context or DEFAULT_CONTEXT, edge_wait_s=wait, core=self._core, edge_model=self.local_model
        )
        for rule in self.rules:
            if rule.matches(features):
                model = self.local_model if rule.route == "edge" else self._core_model()
                return Decision(model, rule.route, rule.name, rule.degraded)
        return Decision(self.local_model, "edge", "none-matched")  # a table without a catch-all

    def _core_model(self) -> str:
        return self.core_model or next(iter(self.bus.link.models), AUTO)


class LinkMetrics(Collector):
    """The link's state on the edge's /metrics."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("blink_edge_link_up", "1 while the link to the core is connected")
        up.add_metric([], 1.0 if self.link.connected else 0.0)
        rtt = GaugeMetricFamily("blink_edge_link_rtt_seconds", "the link's smoothed ping round trip")
        rtt.add_metric([], self.link.rtt_s or 0.0)
        connects = CounterMetricFamily("blink_edge_link_connects", "connections to the core opened (1 + reconnects)")
        connects.add_metric([], self.link.connects)
        yield from (up, rtt, connects)
