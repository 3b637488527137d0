"""OpenAI-compatible HTTP with real clients (httpx, openai) against the live gateway (scripted replicas)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from blink.bus.messages import ReplicaState
from tests.unit.gateway.conftest import MODEL, FakeReplica, LiveServer

Serve = Callable[..., LiveServer]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def wait_for(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sse_events(response: httpx.Response) -> list[Any]:
    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {**CHAT, "temperature": 9}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": 3}, "prompt"),
    ],
)
def test_a_malformed_request_is_400_while_the_replicas_warm(
    serve: Serve, path: str, body: dict[str, Any], param: str
) -> None:
    server = serve(FakeReplica(MODEL, state=ReplicaState.WARMING))
    r = httpx.post(server.base + path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    ready = httpx.post(server.base + "/v1/chat/completions", json=CHAT)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "model_not_ready"
    assert ready.headers["retry-after"] == "1"


def test_a_replica_that_stops_mid_response_is_503_server_shutdown(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica)
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
    threading.Timer(0.3, lambda: server.call(lambda: replica.stop(server.bus))).start()
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and err.value.code == "server_shutdown"
    assert "shutting down" in err.value.message and err.value.response.headers["retry-after"] == "1"


def test_a_replica_that_stops_mid_stream_ends_the_sse_with_server_shutdown(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica)
    threading.Timer(0.3, lambda: server.call(lambda: replica.stop(server.bus))).start()
    with httpx.stream("POST", server.base + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        events = sse_events(r)
    assert events[-2]["error"]["code"] == "server_shutdown" and events[-1] == "[DONE]"


def test_gateway_shutdown_answers_an_in_flight_request_with_503(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica)
    threading.Timer(0.3, lambda: server.call(server.gateway.shutdown)).start()
    r = httpx.post(server.base + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown"


def test_a_client_that_disconnects_is_not_answered_and_nothing_fails(serve: Serve) -> None:
    replica = FakeReplica(MODEL, hold=True)
    server = serve(replica)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json=CHAT, timeout=0.5)
    wait_for(lambda: replica.requests and not replica.held)  # the cancel reached the replica
    wait_for(lambda: server.gateway.num_active == 0)
    time.sleep(0.2)  # the endpoint returns after the cancel is sent
    assert server.errors == []


def test_a_response_whose_stream_overflowed_is_503_slow_consumer(serve: Serve) -> None:
    server = serve(FakeReplica(MODEL, reply=tuple("abcdefgh")), stream_queue_events=2)
    r = httpx.post(server.base + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "slow_consumer"
    with httpx.stream("POST", server.base + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        events = sse_events(r)
    assert r.status_code == 200 and events[-2]["error"]["code"] == "slow_consumer" and events[-1] == "[DONE]"


def test_unknown_paths_and_methods_have_their_own_codes(serve: Serve) -> None:
    server = serve()
    missing = httpx.get(server.base + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server.base + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_when_every_replica_would_miss_the_first_token_deadline_new_requests_get_429(serve: Serve) -> None:
    busy = FakeReplica(MODEL, queue_wait_s=14.2, replica_id="busy")
    server = serve(busy, FakeReplica(MODEL, queue_wait_s=12.0, replica_id="busier"), first_token_deadline_s=10)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 5
    while len(httpx.get(f"{server.base}/readyz").json()["replicas"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(f"{server.base}/v1/chat/completions", json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "2"  # the least-loaded replica is 2 s over: 12.0 - 10, rounded up
    assert "12.0 s" in r.json()["error"]["message"]
    assert not busy.requests
    busy.queue_wait_s = 3.0  # one replica catches up: served again
    while httpx.post(f"{server.base}/v1/chat/completions", json=body).status_code == 429:
        assert time.monotonic() < deadline + 5
        time.sleep(0.05)
