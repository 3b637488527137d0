"""A model served under --served-model-name (or the name its path gives): the gateway lists that name, routes it to
the replicas of that pool, and refuses every other name for the model, its path included."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect

from blink.config import ModelConfig
from tests.e2e.test_realtime import recv
from tests.unit.gateway.conftest import FakeReplica, LiveServer

Serve = Callable[..., LiveServer]
PATH = "/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf"


def chat(server: LiveServer, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    return httpx.post(server.base + "/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    ("served", "name", "refused"),
    [
        ("my-llama", "my-llama", [PATH, "Llama-3.2-1B-Instruct-Q4_K_M"]),
        ("", "Llama-3.2-1B-Instruct-Q4_K_M", [PATH]),
    ],
)
def test_clients_use_the_served_name_and_only_it(serve: Serve, served: str, name: str, refused: list[str]) -> None:
    model = ModelConfig(model=PATH, served_model_name=served)
    replica = FakeReplica(model.served_name())  # the pool a Replica of this config joins (test_served_name.py)
    server = serve(replica)
    assert [m["id"] for m in httpx.get(server.base + "/v1/models").json()["data"]] == [name]
    r = chat(server, name)
    assert r.status_code == 200 and r.json()["model"] == name
    assert [req.model for req in replica.requests] == [name]
    for other in refused:
        r = chat(server, other)
        error = r.json()["error"]
        assert r.status_code == 404 and error["code"] == "model_not_found"
        assert f"this server serves {name}" in error["message"]
    assert len(replica.requests) == 1

    async def realtime() -> None:
        async with connect(f"{server.ws_url}?model={quote(name)}") as ws:
            assert (await recv(ws))["session"]["model"] == name
        async with connect(f"{server.ws_url}?model={quote(refused[0])}") as ws:
            assert (await recv(ws))["error"]["code"] == "model_not_found"

    asyncio.run(realtime())
