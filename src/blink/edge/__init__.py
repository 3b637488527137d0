"""The edge role (`blink edge --core URL`): a gateway with its own small replica that answers the requests its
routing table keeps (policy.py) and forwards the rest to a core gateway over one warm link (link.py)."""

from __future__ import annotations

from blink.bus.base import Bus
from blink.config import EdgeConfig
from blink.edge.bus import EdgeBus
from blink.edge.link import Link
from blink.edge.policy import AUTO, load_rules
from blink.edge.router import Router


def edge_parts(config: EdgeConfig, local: Bus, local_model: str) -> tuple[EdgeBus, Router]:
    """The edge's bus (its replicas here, the core's over the link) and router. ValueError: a bad --core or
    --routing."""
    rules = load_rules(config.routing)
    link = Link(
        config.core,
        config.core_key,
        resume_window_s=config.link_resume_window_s,
        ping_interval_s=config.link_ping_s,
        ping_timeout_s=config.link_timeout_s,
    )
    bus = EdgeBus(local, link, {local_model})
    return bus, Router(bus, local_model, rules, config.core_model)


__all__ = ["AUTO", "EdgeBus", "Link", "Router", "edge_parts"]
