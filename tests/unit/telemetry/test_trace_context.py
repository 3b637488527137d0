"""The client's W3C trace context is honoured over HTTP (the `traceparent` header): a real gateway on a socket
with a scripted replica (the replica's own spans are tested in test_tracing.py with a real one)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.unit.gateway.conftest import MODEL, LiveServer

Serve = Callable[..., LiveServer]
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_an_http_traceparent_is_the_parent_of_the_response_trace(serve: Serve, spans: InMemorySpanExporter) -> None:
    server = serve()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    httpx.post(f"{server.base}/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
    (root,) = [s for s in spans.get_finished_spans() if s.name == "blink.response"]
    assert root.context is not None and f"{root.context.trace_id:032x}" == trace_id
    assert root.parent is not None and f"{root.parent.span_id:016x}" == span_id
    # a malformed header starts a trace of its own instead of failing the request
    httpx.post(f"{server.base}/v1/chat/completions", json=BODY, headers={"traceparent": "x"}).raise_for_status()
    roots = [s for s in spans.get_finished_spans() if s.name == "blink.response"]
    assert len(roots) == 2 and roots[1].parent is None
