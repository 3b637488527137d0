"""OpenTelemetry tracing: one trace per response, from the gateway through the bus into the replica and its engine.

Off unless `blink serve|worker` runs with OTEL_TRACES_EXPORTER=otlp or console (cli.py reads it and calls `setup`);
off, every hook below is one `is None` test. The SDK reads the other standard variables itself
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, ...).

The spans tile the response's time, so their durations add up to its end-to-end time:

    blink.response (gateway, SERVER; GenAI attributes)
      gateway          arrival -> the cache lookup (or the submit): validation, pre-load stop, retrieval
      cache.lookup     the semantic cache (attributes: hit, similarity)
      bus.publish      the submit -> the replica reads the request       } made by the replica, from the time
      replica.queue    read -> first scheduled by the engine              } the gateway wrote in the request
      engine.prefill   scheduled -> first token (prompt, cached and computed tokens)
      first_token      first token -> its text published on the bus
      engine.decode    first text published -> the replica ended it (output tokens, speculative counts)
      stream.end       the replica's last event -> the gateway ended the response

The replica's spans are children of the gateway's span through the W3C `traceparent` the request carries on the
bus (both transports), so a response served by a worker process on another machine is one trace (times there come
from that machine's clock). A `traceparent` from the client (HTTP header, WebSocket field) is the root's parent.
Pre-loads (background work) are not traced.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

EXPORTERS = ("otlp", "console", "none")
_propagator = TraceContextTextMapPropagator()
_tracer: Tracer | None = None


def setup(exporter: str, service_name: str) -> None:
    """Trace this process as `service_name` (cli.py passes OTEL_SERVICE_NAME when set): export with `exporter`
    (otlp: OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT; console: stdout); "" or "none": off."""
    if exporter in ("", "none"):
        return
    if exporter not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: blink supports {', '.join(EXPORTERS)}")
    out: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out = OTLPSpanExporter()
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(out) if exporter == "otlp" else SimpleSpanProcessor(out))
    use(provider)


def use(provider: TracerProvider | None) -> None:
    """Trace with `provider` (tests: one with an in-memory exporter); None: tracing off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("blink")


def shutdown() -> None:
    """Flush what is still buffered (at exit)."""
    provider = trace.get_tracer_provider()
    if _tracer is not None and isinstance(provider, TracerProvider):
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def parent(traceparent: str | None) -> Context | None:
    """The context a W3C traceparent names (None when absent or malformed)."""
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


def wall(monotonic_s: float) -> float:
    """The unix time of a time.monotonic() reading."""
    return time.time() - (time.monotonic() - monotonic_s)


class ResponseTrace:
    """The gateway's part of one response's trace: the root span, and its own child spans made at the end from
    the times recorded on the way (`mark`)."""

    def __init__(self, tracer: Tracer, arrived: float, attributes: dict[str, Any], client: str | None) -> None:
        self._tracer = tracer
        self.marks: dict[str, float] = {"arrived": arrived}
        self.lookup_attributes: dict[str, Any] = {}
        self.root = tracer.start_span(
            "blink.response",
            context=parent(client),
            kind=SpanKind.SERVER,
            start_time=_ns(arrived),
            attributes=attributes,
        )
        self.traceparent = carrier(self.root)

    def mark(self, name: str, at: float | None = None) -> float:
        self.marks[name] = time.time() if at is None else at
        return self.marks[name]

    def end(self, attributes: dict[str, Any], replica_done: float | None) -> None:
        """End the response: the gateway's child spans from the marks, then the root."""
        m, now = self.marks, time.time()
        ctx = trace.set_span_in_context(self.root)
        first = m.get("lookup_start", m.get("submitted", now))
        self._child(ctx, "gateway", m["arrived"], first)
        if "lookup_start" in m:
            self._child(ctx, "cache.lookup", m["lookup_start"], m["lookup_end"], self.lookup_attributes)
        if replica_done is not None:
            self._child(ctx, "stream.end", replica_done, now)
        elif "lookup_end" in m and "submitted" not in m:  # answered from the cache: its replay
            self._child(ctx, "cache.replay", m["lookup_end"], now)
        self.root.set_attributes(attributes)
        self.root.end(end_time=_ns(now))

    def _child(self, ctx: Context, name: str, start: float, end: float, attributes: Any = None) -> None:
        span = self._tracer.start_span(name, context=ctx, start_time=_ns(start), attributes=attributes)
        span.end(end_time=_ns(max(start, end)))


def start_response(arrived_monotonic: float, attributes: dict[str, Any], client: str | None) -> ResponseTrace | None:
    if _tracer is None:
        return None
    return ResponseTrace(_tracer, wall(arrived_monotonic), attributes, client)


def carrier(span: Any) -> str:
    out: dict[str, str] = {}
    _propagator.inject(out, context=trace.set_span_in_context(span))
    return out["traceparent"]


def replica_spans(traceparent: str | None, spans: list[tuple[str, float, float, dict[str, Any]]]) -> None:
    """A replica's spans of one request, (name, start, end, attributes) in unix seconds, under the gateway's span
    that `traceparent` names."""
    ctx = parent(traceparent)
    if _tracer is None or ctx is None:
        return
    for name, start, end, attributes in spans:
        span = _tracer.start_span(name, context=ctx, start_time=_ns(start), attributes=attributes)
        span.end(end_time=_ns(max(start, end)))
