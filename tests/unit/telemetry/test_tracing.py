"""One connected trace per WebSocket response, from the gateway through the bus into a real replica (its model
and engine), on both transports: an in-memory span exporter collects the spans of both sides. On Redis the
gateway and the replica each have their own bus, as two processes would."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import connect

from blink.bus.base import Bus
from blink.bus.memory import MemoryBus
from blink.bus.redis import RedisBus
from blink.config import EngineConfig, GatewayConfig, ModelConfig, default_cache_dir
from blink.gateway.app import create_app
from blink.gateway.server import http_server
from blink.gateway.service import Gateway
from blink.worker.replica import Replica
from tests.e2e.test_realtime import recv, until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow  # loads the model

MODEL = "smollm2-135m-instruct"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TILES = ["gateway", "bus.publish", "replica.queue", "engine.prefill", "first_token", "engine.decode", "stream.end"]


def serve_and_ask(gateway_bus: Bus, replica_bus: Bus) -> dict[str, Any]:
    """A live gateway with a real replica; one WebSocket response whose response.create carries a traceparent."""
    gateway = Gateway(gateway_bus, GatewayConfig(port=0), [MODEL])
    replica = Replica(
        replica_bus, ModelConfig(cache_dir=default_cache_dir()), EngineConfig(warmup_steps=1), progress=False
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for bus in {id(b): b for b in (gateway_bus, replica_bus)}.values():
            await bus.start()
        task = asyncio.create_task(replica.run())
        yield
        await replica.stop()
        await task
        for bus in {id(b): b for b in (gateway_bus, replica_bus)}.values():
            await bus.close()

    server = http_server(create_app(gateway, lifespan), gateway, log_level="warning")
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()

    async def main() -> dict[str, Any]:
        while not server.started:
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        deadline = asyncio.get_running_loop().time() + 120
        while not gateway.ready_replicas():  # the replica runs on the server's loop: poll, never wait on its Event
            assert asyncio.get_running_loop().time() < deadline, "the replica did not get ready"
            await asyncio.sleep(0.1)
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            await recv(ws)
            content = [{"type": "input_text", "text": "Name three colours."}]
            await ws.send(
                json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": content}})
            )
            await until(ws, "conversation.item.done")
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            await ws.send(
                json.dumps(
                    {"type": "response.create", "response": {"max_output_tokens": 12}, "traceparent": traceparent}
                )
            )
            done, _ = await until(ws, "response.done")
            return done["response"]  # type: ignore[no-any-return]

    try:
        return asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_a_websocket_response_is_one_trace_across_gateway_and_replica(
    transport: str, spans: InMemorySpanExporter, model_dir: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    if transport == "memory":
        bus = MemoryBus()
        response = serve_and_ask(bus, bus)
    else:
        response = serve_and_ask(
            RedisBus(redis_server.url, prefix=redis_prefix), RedisBus(redis_server.url, prefix=redis_prefix)
        )
    assert response["status"] in ("completed", "incomplete")
    finished: list[ReadableSpan] = [s for s in spans.get_finished_spans() if s.name != "engine.warmup"]
    (root,) = [s for s in finished if s.name == "blink.response"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE  # the client's trace, under the client's span
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    attributes = dict(root.attributes or {})
    assert attributes["gen_ai.request.model"] == MODEL and attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.usage.output_tokens"] == response["usage"]["output_tokens"]
    children = [s for s in finished if s is not root]
    assert sorted(s.name for s in children) == sorted(TILES)
    for span in children:  # one trace: every span a child of the response's
        assert span.context is not None and span.context.trace_id == root.context.trace_id
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    prefill = next(s for s in children if s.name == "engine.prefill")
    assert dict(prefill.attributes or {})["gen_ai.usage.input_tokens"] == response["usage"]["input_tokens"]
    # the spans tile the response: one after another, their durations add up to the whole
    ordered = sorted(children, key=lambda s: (s.start_time or 0, TILES.index(s.name)))
    assert [s.name for s in ordered] == TILES
    for before, after in itertools.pairwise(ordered):
        assert (after.start_time or 0) >= (before.end_time or 0) - 1_000_000  # 1 ms: clocks read a moment apart
    total = sum((s.end_time or 0) - (s.start_time or 0) for s in children)
    whole = (root.end_time or 0) - (root.start_time or 0)
    assert abs(total - whole) <= 0.05 * whole + 2_000_000, (total, whole)
