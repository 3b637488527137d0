"""A WebSocket response through Redis and a worker process is one OpenTelemetry trace: the gateway and the worker
export over OTLP/HTTP (OTEL_TRACES_EXPORTER=otlp) to a small receiver in this test, which decodes what they send."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from websockets.asyncio.client import connect

from tests.e2e.conftest import Server
from tests.e2e.test_realtime import recv, until
from tests.e2e.test_scale_out import start_worker, wait_for_ready_replicas
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

PATH = ["gateway", "cache.lookup", "bus.publish", "replica.queue", "engine.prefill", "first_token", "engine.decode"]


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: the spans sent to it, as (service, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        received = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        received.extend((attrs.get("service.name", ""), span) for span in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_a_response_through_redis_and_a_worker_is_one_trace_whose_spans_add_up(
    tmp_path: Path, model_dir: Path, receiver: Receiver
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with RedisServer() as redis, (tmp_path / "worker.log").open("wb") as worker_log:
        worker = start_worker(redis, worker_log, env=env)
        gateway = Server(tmp_path / "gateway.log", "--redis", redis.url, "--no-local-replica", env=env)
        try:
            gateway.wait_ready()
            wait_for_ready_replicas(gateway, 1)

            async def main() -> tuple[dict[str, Any], float]:
                async with connect(gateway.ws_url) as ws:
                    await recv(ws)
                    content = [{"type": "input_text", "text": "Say something about rivers."}]
                    item = {"type": "message", "role": "user", "content": content}
                    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                    await until(ws, "conversation.item.done")
                    started = time.monotonic()
                    await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 24}}))
                    done, _ = await until(ws, "response.done")
                    return done["response"], time.monotonic() - started

            _, client_s = asyncio.run(main())
            deadline = time.monotonic() + 20
            while not any(s.name == "engine.decode" for _, s in receiver.spans) or not any(
                s.name == "blink.response" for _, s in receiver.spans
            ):
                assert time.monotonic() < deadline, [s.name for _, s in receiver.spans]
                time.sleep(0.1)
        finally:
            worker.terminate()
            worker.wait(30)
            gateway.stop()
    roots = [(svc, s) for svc, s in receiver.spans if s.name == "blink.response"]
    assert len(roots) == 1, roots  # the warm-up generates nothing traced
    service, root = roots[0]
    assert service == "blink-gateway"
    trace = [(svc, s) for svc, s in receiver.spans if s.trace_id == root.trace_id and s is not root]
    names = [s.name for _, s in trace]
    assert set(PATH) <= set(names), names
    assert {svc for svc, s in trace if s.name in ("replica.queue", "engine.prefill", "engine.decode")} == {
        "blink-worker"
    }  # made in the worker process, in the gateway's trace
    assert all(s.parent_span_id == root.span_id for _, s in trace)
    whole = root.end_time_unix_nano - root.start_time_unix_nano
    total = sum(s.end_time_unix_nano - s.start_time_unix_nano for _, s in trace)
    assert abs(total - whole) <= 0.05 * whole, (total, whole, names)
    assert whole / 1e9 <= client_s  # the server's span lies within what the client measured
    parts = ", ".join(f"{s.name} {(s.end_time_unix_nano - s.start_time_unix_nano) / 1e6:.1f} ms" for _, s in trace)
    print(f"\ntrace: {parts}; sum {total / 1e6:.1f} ms, response {whole / 1e6:.1f} ms, client {client_s * 1e3:.1f} ms")
