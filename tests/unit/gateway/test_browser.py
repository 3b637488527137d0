"""Browser-facing defences: the pure rules (origins, hosts, media types), then the middleware on a live gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from blink.config import GatewayConfig
from blink.errors import InvalidRequest, UnsupportedMediaType
from blink.gateway import browser
from blink.gateway import validation as v
from blink.gateway.app import create_app
from blink.gateway.service import Gateway
from tests.unit.gateway.conftest import MODEL, LiveServer

Serve = Callable[..., LiveServer]


@pytest.mark.parametrize(
    ("origin", "normalized"),
    [
        ("http://localhost:5173", "http://localhost:5173"),
        ("HTTPS://App.Example:443", "https://app.example"),
        ("http://example.com:80/", "http://example.com"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("null", None),
        ("file://", None),
        ("ws://example.com", None),
        ("http://example.com:99999", None),
        ("http://example.com/path", None),
    ],
)
def test_origins_are_normalized_or_refused(origin: str, normalized: str | None) -> None:
    assert browser.normalize_origin(origin) == normalized


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        ("http://evil.example", "127.0.0.1:8000", (), False),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", (), True),  # the server's own page
        ("https://blink.example", "blink.example", (), True),
        ("https://blink.example", "blink.example:443", (), True),
        ("http://localhost:3000", "127.0.0.1:8000", (), True),  # a loopback page, any port
        ("https://[::1]:1", "127.0.0.1:8000", (), True),
        ("http://localhost.evil.example", "127.0.0.1:8000", (), False),
        ("null", "127.0.0.1:8000", (), False),
        ("https://app.example", "api.example", ("https://app.example",), True),
        ("http://localhost:3000", "api.example", ("https://app.example",), False),  # the list replaces loopback
        ("http://api.example", "api.example", ("https://app.example",), True),
        ("http://evil.example", "api.example", ("*",), True),
    ],
)
def test_which_pages_may_open_a_websocket(origin: str, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert browser.origin_allowed(origin, host, allowed) is ok


def test_trusted_hosts_are_loopback_the_bound_address_and_the_flag() -> None:
    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert browser.trusted_hosts(GatewayConfig()) == loopback
    assert browser.trusted_hosts(GatewayConfig(host="10.0.0.5")) == [*loopback, "10.0.0.5"]
    assert browser.trusted_hosts(GatewayConfig(host="0.0.0.0")) == loopback
    assert browser.trusted_hosts(GatewayConfig(host="fe80::1", allowed_hosts="API.example, *.example.org")) == [
        *loopback,
        "[fe80::1]",
        "api.example",
        "*.example.org",
    ]
    assert browser.wildcard_bind_warning(GatewayConfig(host="0.0.0.0")) is not None
    assert browser.wildcard_bind_warning(GatewayConfig(host="0.0.0.0", allowed_hosts="*")) is None
    assert browser.cors_origins(GatewayConfig(cors_origins="https://App.example/, *")) == ("https://app.example", "*")


@pytest.mark.parametrize(
    "config",
    [GatewayConfig(allowed_hosts="api*.ex"), GatewayConfig(allowed_origins="x"), GatewayConfig(cors_origins="a/b")],
)
def test_a_browser_flag_that_is_not_one_is_a_value_error(config: GatewayConfig) -> None:
    from blink.bus.memory import MemoryBus

    with pytest.raises(ValueError, match=r"-origins|--allowed-hosts"):
        create_app(Gateway(MemoryBus(), config, [MODEL]))


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=UTF-8", True),
        ('application/json; charset="utf-8"', True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        (None, False),
    ],
)
def test_bodies_must_be_declared_json(content_type: str | None, ok: bool) -> None:
    if ok:
        v.check_json_media_type(content_type)
    else:
        with pytest.raises(UnsupportedMediaType) as err:
            v.check_json_media_type(content_type)
        assert err.value.status == 415 and err.value.code == "unsupported_media_type"


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000,  # json.loads would raise RecursionError
        b"[" * 100_000,
        '{"a": ' + "[" * 64 + "]" * 64 + "}",  # 65 levels: valid JSON, over the bound
        '{"a": ' + "1" * 5000 + "}",  # an integer too long for int()
    ],
)
def test_deep_or_huge_json_is_invalid_json(raw: str | bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        v.parse_object(raw)
    assert err.value.code == "invalid_json" and err.value.status == 400


def test_nesting_is_measured_without_counting_brackets_in_strings() -> None:
    ok = '{"a": ' + "[" * 63 + "]" * 63 + ', "s": "' + "[" * 500 + '"}'
    assert v.parse_object(ok)["s"] == "[" * 500
    assert v.nesting_depth(json.loads("[" * 200 + "]" * 200)) == v.MAX_JSON_DEPTH + 1  # counted up to the bound
    assert [v.nesting_depth(x) for x in (1, [], {"a": [{}]}, [1, [2, [3]]])] == [0, 1, 3, 3]


def test_a_websocket_from_another_site_gets_403_and_one_log_line(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve()

    async def main() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.ws_url, origin="http://evil.example")  # type: ignore[arg-type]
        response = refused.value.response
        assert response.status_code == 403
        assert json.loads(response.body)["error"]["code"] == "origin_not_allowed"
        for origin in (None, server.base, "http://localhost:1234"):
            async with connect(server.ws_url, origin=origin) as ws:  # type: ignore[arg-type]
                assert json.loads(await ws.recv())["type"] == "session.created"

    with caplog.at_level("INFO", logger="blink.gateway.browser"):
        asyncio.run(main())
    assert [r.levelname for r in caplog.records if "evil.example" in r.getMessage()] == ["INFO"]
    assert not [r for r in caplog.records if r.exc_info] and not server.errors


def test_a_foreign_host_is_400_and_a_text_body_415(serve: Serve) -> None:
    server = serve()
    assert httpx.get(server.base + "/v1/models", headers={"Host": "evil.example"}).status_code == 400
    body = json.dumps({"model": MODEL, "prompt": "hi"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(server.base + "/v1/completions", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "access-control-allow-origin" not in httpx.get(server.base + "/v1/models", headers={"Origin": "x"}).headers


def test_deep_json_and_odd_headers_are_400_not_500(serve: Serve) -> None:
    server = serve()
    deep = "[" * 100_000
    r = httpx.post(server.base + "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for last in ("resp:²".encode("latin-1"), b"resp:--1", b"resp:" + b"9" * 5000):
        r = httpx.post(server.base + "/v1/chat/completions", json={}, headers={"Last-Event-ID": last})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"

    async def main() -> None:
        async with connect(server.ws_url) as ws:
            await ws.recv()
            await ws.send(deep)
            event = json.loads(await ws.recv())
            assert event["type"] == "error" and event["error"]["code"] == "invalid_json"

    asyncio.run(main())
    assert not server.errors


def test_json_that_cannot_be_hashed_where_a_name_is_expected_is_a_400(serve: Serve) -> None:
    # found by benchmarks/fuzz.py: a content part's type of [] reached `in TEXT_PARTS` (a set): internal_error
    server = serve()
    item = {"type": "message", "role": "user", "content": [{"type": [], "text": "x"}]}

    async def main() -> None:
        async with connect(server.ws_url) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            event = json.loads(await ws.recv())
            assert event["type"] == "error" and event["error"]["code"] == "invalid_request", event

    asyncio.run(main())
    assert not server.errors
