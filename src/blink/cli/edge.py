"""`blink edge`: the gateway over an edge's bus (its replica here, the core's models over the link), routed by the
edge's table (blink/edge/); `blink serve` (run.py) runs it with its own parts."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from blink.config import ServeConfig

if TYPE_CHECKING:
    from blink.bus.base import Bus
    from blink.gateway.keys import Authenticator
    from blink.gateway.service import Gateway
    from blink.gateway.sessions import SessionStore
    from blink.preload.store import TenantStores
    from blink.semantic_cache.cache import SemanticCache

log = logging.getLogger("blink.edge")


def edge_gateway(
    config: ServeConfig,
    local: Bus,
    name: str,
    documents: TenantStores,
    cache: SemanticCache | None,
    sessions: SessionStore | None,
    auth: Authenticator,
) -> tuple[Gateway, Bus] | None:
    """`blink edge`: the gateway over the edge's bus (its replica here, the core's models over the link) with the
    routing table; None after saying why it cannot start."""
    from blink.edge import AUTO, edge_parts
    from blink.edge.router import LinkMetrics
    from blink.gateway.service import Gateway

    assert config.edge is not None
    if not config.edge.core:
        print("blink edge: --core is required (the core gateway's http(s)://host:port)", file=sys.stderr)
        return None
    try:
        bus, router = edge_parts(config.edge, local, name)
    except ValueError as exc:
        print(f"blink: {exc}", file=sys.stderr)
        return None
    gateway = Gateway(bus, config.gateway, [AUTO, name], documents, cache, sessions, auth, router)

    clashes: set[str] = set()

    def learn(models: list[str]) -> None:  # the core's models become this gateway's too
        gateway.models.extend(m for m in models if m not in gateway.models)
        if name in models and name not in clashes:  # requests naming it stay here: the core's is out of reach
            clashes.add(name)
            log.warning("the core serves a model named %r too; give it another (--served-model-name)", name)

    bus.link.on_status = learn
    gateway.metrics.registry.register(LinkMetrics(bus.link))
    return gateway, bus
