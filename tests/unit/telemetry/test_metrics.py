"""GET /metrics: Prometheus text that prometheus_client's own parser reads, and whose counters move as requests
run (a real gateway on a socket, scripted replicas)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer

Serve = Callable[..., LiveServer]


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{server.base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_parse_and_move_as_requests_run(serve: Serve) -> None:
    replica = FakeReplica(MODEL, reply=("a", "b", "c", "d"), replica_id="r1", queue_wait_s=0.25)
    server = serve(replica)
    before = scrape(server)
    assert value(before, "blink_responses_total") == 0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(f"{server.base}/v1/chat/completions", json=body).raise_for_status()
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json={**body, "stream": True}) as r:
        for _ in r.iter_lines():
            pass
    after = scrape(server)
    assert value(after, "blink_responses_total", model=MODEL, status="stop") == 2
    assert value(after, "blink_time_to_first_token_seconds_count", cache="off", preloaded="false", route="core") == 2
    assert value(after, "blink_e2e_latency_seconds_count", model=MODEL) == 2
    assert value(after, "blink_inter_token_latency_seconds_count", model=MODEL) == 6  # 3 gaps in each of 2
    assert value(after, "blink_prompt_tokens_total", model=MODEL) == 14  # the fake replica counts 7 per prompt
    assert value(after, "blink_generation_tokens_total", model=MODEL) == 8
    assert value(after, "blink_replica_ready", replica="r1", model=MODEL) == 1
    assert value(after, "blink_queue_wait_seconds", replica="r1") == 0.25
    assert value(after, "blink_queue_depth", model=MODEL) == 0
    assert ("blink_semantic_cache_lookups_total", (("result", "hit"),)) in after
