"""/openapi.json says what the handlers accept: bodies schemathesis generates from it are taken (200) when they fit
it and refused with a 4xx when they do not, on the live gateway with scripted replicas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from blink.gateway.openapi import openapi_document
from tests.unit.gateway.conftest import MODEL, LiveServer

Serve = Callable[..., LiveServer]
GENERATION = ("POST /v1/chat/completions", "POST /v1/completions")


def test_the_document_loads_and_lists_every_route() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document([MODEL], 2048, documents=True))
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {
        *GENERATION,
        "GET /v1/models",
        "DELETE /v1/cache",
        "POST /v1/documents",
        "GET /v1/documents",
        "GET /v1/documents/{id}",
        "DELETE /v1/documents/{id}",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }
    assert openapi_document([MODEL], 2048, documents=False)["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
    }


@pytest.mark.slow  # generated requests (schemathesis), ~4 s a mode
@pytest.mark.parametrize("mode", list(GenerationMode))
def test_generated_bodies_are_answered_as_the_document_says(serve: Serve, mode: GenerationMode) -> None:
    server = serve()
    document = httpx.get(server.base + "/openapi.json").json()
    assert document["components"]["schemas"]["Model"]["enum"] == [MODEL]
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations() if result.ok().label in GENERATION]
    statuses: list[tuple[int, str]] = []
    client = httpx.Client(base_url=server.base, timeout=10)

    @seed(7)
    @settings(
        max_examples=60, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(case=st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations)))
    def run(case: Any) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "last-event-id"}  # a resume
        kwargs = case.as_transport_kwargs(base_url=server.base)
        response = client.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), **_body(kwargs))
        statuses.append(
            (response.status_code, f"{kwargs['method']} {kwargs['url']} {_body(kwargs)} -> {response.text[:200]}")
        )

    run()
    client.close()
    assert statuses and not server.errors
    if mode is GenerationMode.POSITIVE:
        assert all(status == 200 for status, _ in statuses), [s for s in statuses if s[0] != 200][:5]
    else:
        assert all(400 <= status < 500 for status, _ in statuses), [s for s in statuses if not 400 <= s[0] < 500][:5]


def _body(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "json" in kwargs:
        return {"json": kwargs["json"]}
    if "data" in kwargs:
        return {"content": kwargs["data"] if isinstance(kwargs["data"], bytes | str) else str(kwargs["data"])}
    return {}
