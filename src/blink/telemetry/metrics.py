"""Prometheus metrics of one gateway, served at GET /metrics (text format).

Measured at the gateway, per response (labels: model; route `core|edge|cache` (a gateway without an edge's router
serves everything as `core`); cache `hit|miss|off`; preloaded `true|false`):
    blink_time_to_first_token_seconds        request arrival -> first text delta sent
    blink_inter_token_latency_seconds        gap between consecutive deltas of a response
    blink_e2e_latency_seconds                arrival -> the response's end
    blink_responses_total{status}            ended responses by finish status
    blink_prompt_tokens_total, blink_generation_tokens_total, blink_prefix_cache_hit_tokens_total
    blink_semantic_cache_lookups_total{result=hit|miss}
    blink_routes_total{route, rule}          an edge's routing decisions (edge/policy.py)
An edge adds its link's state: blink_edge_link_up, blink_edge_link_rtt_seconds, blink_edge_link_connects_total.
Read from the replicas' latest heartbeats at scrape time (label replica, model):
    blink_replica_ready, blink_running_sequences, blink_waiting_sequences, blink_kv_blocks_used,
    blink_kv_blocks_free, blink_queue_wait_seconds (estimate), blink_speculative_proposed_tokens_total,
    blink_speculative_accepted_tokens_total
and blink_queue_depth{model}: requests waiting for a first token, this gateway's not yet accepted by a replica plus
the replicas' waiting sequences. With a local `--engine vllm` replica, vLLM's own metrics (`vllm:*`, from its
Prometheus stat logger) follow blink's.

Each gateway has its own registry (tests run several in one process); nothing here is global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# interactive latencies: 5 ms .. 60 s
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
RESPONSE_LABELS = ("model", "route", "cache", "preloaded")


class _Replicas(Collector):
    """Gauges and counters from the latest heartbeat of each replica, read when scraped."""

    def __init__(self, replicas: Callable[[], list[Any]], unaccepted: Callable[[], dict[str, int]]) -> None:
        self._replicas = replicas  # of bus.messages.ReplicaStatus (telemetry is a leaf: it imports no blink module)
        self._unaccepted = unaccepted

    def collect(self) -> Iterator[Metric]:
        labels = ["replica", "model"]
        families = {
            "ready": GaugeMetricFamily("blink_replica_ready", "1 when the replica takes traffic", labels=labels),
            "running": GaugeMetricFamily("blink_running_sequences", "sequences decoding", labels=labels),
            "waiting": GaugeMetricFamily("blink_waiting_sequences", "sequences not yet running", labels=labels),
            "used": GaugeMetricFamily("blink_kv_blocks_used", "KV blocks held by sequences", labels=labels),
            "free": GaugeMetricFamily(
                "blink_kv_blocks_free", "KV blocks free (cached-only blocks count as free)", labels=labels
            ),
            "wait": GaugeMetricFamily(
                "blink_queue_wait_seconds",
                "the replica's estimate of a new request's wait for its first token",
                labels=labels,
            ),
        }
        proposed = CounterMetricFamily(
            "blink_speculative_proposed_tokens", "guessed tokens verified by the target model", labels=labels
        )
        accepted = CounterMetricFamily(
            "blink_speculative_accepted_tokens", "guessed tokens the target model accepted", labels=labels
        )
        preloaded = CounterMetricFamily(
            "blink_preload_prefill_tokens", "prompt tokens pre-loading computed while users typed", labels=labels
        )
        preload_used = CounterMetricFamily(
            "blink_preload_used_tokens", "of those, tokens a live request then found in the cache", labels=labels
        )
        depth: dict[str, float] = dict(self._unaccepted())
        for r in self._replicas():
            values = [r.replica_id, r.model]
            families["ready"].add_metric(values, 1.0 if r.state.value == "ready" else 0.0)
            families["running"].add_metric(values, r.running)
            families["waiting"].add_metric(values, r.waiting)
            families["used"].add_metric(values, r.kv_blocks_in_use)
            families["free"].add_metric(values, max(0, r.kv_blocks_total - r.kv_blocks_in_use))
            families["wait"].add_metric(values, r.queue_wait_s)
            proposed.add_metric(values, r.spec_proposed)
            accepted.add_metric(values, r.spec_accepted)
            preloaded.add_metric(values, r.background_prefill_tokens)
            preload_used.add_metric(values, r.background_tokens_used)
            depth[r.model] = depth.get(r.model, 0) + r.waiting
        queue = GaugeMetricFamily(
            "blink_queue_depth", "requests waiting for their first token (bus and replicas)", labels=["model"]
        )
        for model, n in sorted(depth.items()):
            queue.add_metric([model], n)
        yield from families.values()
        yield from (proposed, accepted, preloaded, preload_used, queue)


class Metrics:
    def __init__(self, replicas: Callable[[], list[Any]], unaccepted: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(
            "blink_time_to_first_token_seconds",
            "request arrival to its first text delta",
            RESPONSE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "blink_inter_token_latency_seconds",
            "time between consecutive text deltas of a response",
            ("model", "route"),
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "blink_e2e_latency_seconds",
            "request arrival to the response's end",
            RESPONSE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter("blink_responses", "ended responses", ("model", "status"), registry=r)
        self.prompt_tokens = Counter("blink_prompt_tokens", "prompt tokens of ended responses", ("model",), registry=r)
        self.generation_tokens = Counter(
            "blink_generation_tokens", "tokens generated for ended responses", ("model",), registry=r
        )
        self.prefix_hit_tokens = Counter(
            "blink_prefix_cache_hit_tokens",
            "prompt tokens whose KV came from a replica's prefix cache",
            ("model",),
            registry=r,
        )
        self.cache_lookups = Counter(
            "blink_semantic_cache_lookups", "semantic cache lookups by result", ("result",), registry=r
        )
        for result in ("hit", "miss"):
            self.cache_lookups.labels(result)  # exported from the start, at 0
        self.routes = Counter(
            "blink_routes",
            "an edge's routing decisions of live requests (rule: the table's, or named)",
            ("route", "rule"),
            registry=r,
        )
        self.predecode_tokens = Counter(
            "blink_predecode_tokens",
            "tokens pre-decoded while users paused: adopted (sent at submit) or wasted (the draft changed)",
            ("outcome",),
            registry=r,
        )
        for outcome in ("adopted", "wasted"):
            self.predecode_tokens.labels(outcome)
        r.register(_Replicas(replicas, unaccepted))

    def predecoded(self, outcome: str, tokens: int) -> None:
        self.predecode_tokens.labels(outcome).inc(tokens)

    def itl_observer(self, model: str, route: str) -> Any:
        return self.itl.labels(model, route)

    def response_done(
        self,
        *,
        model: str,
        route: str,
        status: str,
        cache: str,
        preloaded: bool,
        ttft_s: float | None,
        e2e_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> None:
        labels = (model, route, cache, "true" if preloaded else "false")
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        self.e2e.labels(*labels).observe(e2e_s)
        self.responses.labels(model, status).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.prefix_hit_tokens.labels(model).inc(cached_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(_VLLMMetrics())


class _VLLMMetrics:
    """vLLM's own metrics (`vllm:*`) where an `--engine vllm` replica runs in this process: its stat logger keeps
    them in prometheus_client's global registry; nothing elsewhere."""

    def collect(self) -> Iterator[Metric]:
        import sys

        if "vllm" not in sys.modules:
            return
        from prometheus_client import REGISTRY

        yield from (family for family in REGISTRY.collect() if family.name.startswith("vllm:"))
