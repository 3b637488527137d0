"""The Cloudflare Worker router (deploy/cloudflare/worker.js) in workerd, Cloudflare's own runtime, in front of two
real `blink serve` processes: one plays the edge, one the core. Real clients (openai, websockets, httpx) talk to
the Worker; which server answered is read from the servers' own /metrics, beside the Worker's `x-blink-router`.

Opt-in: `make install-workerd`, then `pytest -m workerd`. Each test starts its own workerd (well under a second)
with a capnp config written here: the Worker's settings as text bindings, and an outbound network that may reach
127.0.0.1 (workerd's default reaches public addresses only). A `cf-blob` header carries `request.cf` (its colo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from blink.gateway.keys import KeyFile
from tests.e2e.conftest import MODEL, Server
from tests.redis_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.workerd]

WORKER_DIR = Path(__file__).parents[2] / "deploy" / "cloudflare"
WORKERD = WORKER_DIR / "node_modules" / ".bin" / "workerd"
START_TIMEOUT_S = 30.0
# every answer from the model; two servers on a few cores; an answer whose client left is cancelled after 1 s
SERVER_FLAGS = ("--no-semantic-cache", "--threads", "1", "--resume-window-s", "1")
FRA = {"cf-blob": json.dumps({"colo": "FRA"})}  # workerd parses it into request.cf

CONFIG = """using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "router", worker = (
      modules = [(name = "worker.js", esModule = embed "worker.js")],
      compatibilityDate = {date},
      bindings = [{bindings}],
      globalOutbound = "upstreams",
    )),
    (name = "upstreams", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = {address}, http = (cfBlobHeader = "cf-blob"), service = "router")],
);
"""


class Router:
    """workerd running worker.js with `settings` (its [vars]) on a free 127.0.0.1 port, ready when built."""

    def __init__(self, folder: Path, **settings: str) -> None:
        if not WORKERD.exists():
            pytest.fail(f"no workerd at {WORKERD}: run make install-workerd")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(WORKER_DIR / "worker.js", folder / "worker.js")
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        date = tomllib.loads((WORKER_DIR / "wrangler.toml").read_text())["compatibility_date"]
        assert all(value.isascii() for value in settings.values())  # JSON's escapes are capnp's for ASCII
        bindings = ", ".join(f"(name = {json.dumps(k)}, text = {json.dumps(v)})" for k, v in settings.items())
        config = CONFIG.format(date=json.dumps(date), bindings=bindings, address=json.dumps(f"127.0.0.1:{port}"))
        (folder / "config.capnp").write_text(config)
        self.log_path = folder / "workerd.log"
        with self.log_path.open("wb") as log:
            cmd = [str(WORKERD), "serve", "config.capnp"]
            self.proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening(port)

    def _wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"workerd exited: {self.log()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"workerd not listening after {START_TIMEOUT_S}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def routing(folder: Path, **settings: str) -> Iterator[Router]:
    router = Router(folder, **settings)
    try:
        yield router
    finally:
        router.stop()


def edges(*named: tuple[str, Server | str, list[str]]) -> str:
    """The EDGES setting: (name, server or URL, colos) for each edge."""
    return json.dumps([{"name": n, "url": s if isinstance(s, str) else s.base, "colos": c} for n, s, c in named])


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A keys file both servers read, and its one key: requests pass the router only with their Authorization."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, KeyFile(path).add("router-test")[1]


@contextlib.contextmanager
def servers(folder: Path, keys: Path, *names: str) -> Iterator[list[Server]]:
    """`blink serve` processes, started together, ready when this yields them."""
    started = [Server(folder / f"{name}.log", *SERVER_FLAGS, "--api-keys", str(keys)) for name in names]
    try:
        for srv in started:
            srv.wait_ready()
        yield started
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, key: tuple[Path, str], model_dir: Path
) -> Iterator[tuple[Server, Server]]:
    """(edge, core): both serve MODEL, as a core serves every model an edge does."""
    with servers(tmp_path_factory.mktemp("pair"), key[0], "edge", "core") as (edge, core):
        yield edge, core


def responses(server: Server, status: str | None = None) -> float:
    """Responses the server has ended (its blink_responses_total, all models; all statuses, or `status`)."""
    families = text_string_to_metric_families(httpx.get(f"{server.base}/metrics", timeout=10).text)
    samples = [s for f in families if f.name == "blink_responses" for s in f.samples if s.name.endswith("_total")]
    return sum(s.value for s in samples if status in (None, s.labels["status"]))


def answered_by(servers: dict[str, Server], call: Callable[[], Any], timeout: float = 30) -> tuple[str, Any]:
    """(name of the one server whose count of ended responses `call` raised, what `call` returned)."""
    before = {name: responses(srv) for name, srv in servers.items()}
    result = call()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        grown = [name for name, srv in servers.items() if responses(srv) > before[name]]
        if grown:
            assert len(grown) == 1, f"more than one server answered: {grown}"
            return grown[0], result
        time.sleep(0.1)
    raise AssertionError(f"no server ended a response within {timeout}s")


def chat(router: Router, key: str, text: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}
    auth = {"Authorization": f"Bearer {key}", **(headers or {})}
    return httpx.post(f"{router.base}/v1/chat/completions", json=body, headers=auth, timeout=120)


def test_openai_streams_through_the_nearest_edge_token_by_token(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    settings = {"CORE_URL": core.base, "CORE_MODELS": "large-model", "EDGES": edges(("edge-fra", edge, ["FRA"]))}
    with routing(tmp_path, **settings) as router:
        client = openai.OpenAI(
            base_url=f"{router.base}/v1", api_key=key[1], max_retries=0, timeout=60, default_headers=FRA
        )
        ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the Moon."}]}
        ask |= {"max_tokens": 48, "stream": True, "extra_body": {"ignore_eos": True}}

        def stream() -> tuple[Mapping[str, str], list[tuple[float, str]]]:
            raw = client.chat.completions.with_raw_response.create(**ask)
            arrivals = [(time.monotonic(), c.choices[0].delta.content or "") for c in raw.parse() if c.choices]
            return raw.headers, [(t, text) for t, text in arrivals if text]

        server, (headers, deltas) = answered_by({"edge": edge, "core": core}, stream)
        assert server == "edge" and headers["x-blink-router"] == "edge-fra" and headers["x-blink-router-rule"] == "edge"
        assert len(deltas) > 10 and headers["content-type"].startswith("text/event-stream")
        # streamed as decoded, not buffered: the deltas arrive spread over the decode, at many distinct moments
        times = [t for t, _ in deltas]
        assert times[-1] - times[0] > 0.05 and len({round(t, 3) for t in times}) > len(times) // 2

        # the client's Authorization is what the edge authenticated: none, and the edge refuses
        refused = httpx.post(f"{router.base}/v1/chat/completions", json={"model": MODEL}, headers=FRA, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["x-blink-router"] == "edge-fra"


def test_the_edge_of_the_requests_colo_serves_it_else_the_first(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair  # the core plays a second edge here, edge-iad
    settings = {"CORE_URL": core.base, "EDGES": edges(("edge-iad", core, ["IAD"]), ("edge-fra", edge, ["FRA", "AMS"]))}
    with routing(tmp_path, **settings) as router:
        for colo, name, server in [
            ("AMS", "edge-fra", "edge"),
            ("IAD", "edge-iad", "core"),
            ("SIN", "edge-iad", "core"),
        ]:
            cf = {"cf-blob": json.dumps({"colo": colo})}
            answered, reply = answered_by({"edge": edge, "core": core}, partial(chat, router, key[1], "Hi", cf))
            assert reply.status_code == 200 and reply.headers["x-blink-router"] == name and answered == server, colo


def test_a_request_naming_a_core_model_goes_to_the_core(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    settings = {"CORE_URL": core.base, "CORE_MODELS": f"large-model, {MODEL}", "EDGES": edges(("edge", edge, []))}
    with routing(tmp_path, **settings) as router:
        answered, reply = answered_by({"edge": edge, "core": core}, lambda: chat(router, key[1], "Hi"))
        assert reply.status_code == 200 and answered == "core"
        assert (reply.headers["x-blink-router"], reply.headers["x-blink-router-rule"]) == ("core", "core-model")

        async def realtime() -> Mapping[str, str]:  # ?model= decides a WebSocket's upstream
            auth = {"Authorization": f"Bearer {key[1]}"}
            async with connect(
                f"{router.base.replace('http', 'ws')}/v1/realtime?model={MODEL}", additional_headers=auth
            ) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "session.created"
                assert ws.response is not None
                return ws.response.headers

        assert asyncio.run(realtime())["x-blink-router"] == "core"
        listed = httpx.get(f"{router.base}/v1/models", headers={"Authorization": f"Bearer {key[1]}"}, timeout=30)
        assert listed.headers["x-blink-router-rule"] == "not-generation" and listed.json()["data"][0]["id"] == MODEL


def test_a_prompt_longer_than_the_limit_goes_to_the_core(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    settings = {"CORE_URL": core.base, "EDGES": edges(("edge", edge, [])), "EDGE_MAX_PROMPT_CHARS": "200"}
    with routing(tmp_path, **settings) as router:
        # characters, not bytes: 200 'é' are 400 bytes of UTF-8 and still within the limit
        for text, server, rule in [("é" * 200, "edge", "edge"), ("é" * 201, "core", "long-prompt")]:
            answered, reply = answered_by({"edge": edge, "core": core}, partial(chat, router, key[1], text))
            assert reply.status_code == 200 and answered == server and reply.headers["x-blink-router-rule"] == rule


def test_a_stopped_edge_sends_requests_to_the_next_edge_then_the_core(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    ttl = 2.0
    with servers(tmp_path, key[0], "doomed") as (doomed,):
        shared = {"CORE_URL": core.base, "HEALTH_TTL_S": str(ttl)}
        two = routing(
            tmp_path / "two", **shared, EDGES=edges(("edge-doomed", doomed, ["FRA"]), ("edge-next", edge, []))
        )
        one = routing(tmp_path / "one", **shared, EDGES=edges(("edge-doomed", doomed, ["FRA"])))
        with two as with_next, one as alone:
            for router in (with_next, alone):  # both have checked the edge: healthy for a TTL
                assert chat(router, key[1], "Hi", FRA).headers["x-blink-router"] == "edge-doomed"
            doomed.stop()
            stopped = time.monotonic()
            for router, expected in [(with_next, "edge-next"), (alone, "core")]:
                deadline = time.monotonic() + ttl + 30
                while (reply := chat(router, key[1], "Hi", FRA)).headers["x-blink-router"] != expected:
                    assert time.monotonic() < deadline, f"still {reply.headers['x-blink-router']} after the TTL"
                assert reply.status_code == 200  # no client sees the dead edge: no 502 on the way
            assert time.monotonic() - stopped < ttl + 30
            # the edge stays down: past the TTL it is checked again and found down, and requests keep away
            past = time.monotonic() + ttl
            while time.monotonic() < past:
                assert chat(alone, key[1], "Hi", FRA).headers["x-blink-router"] == "core"


def test_a_realtime_session_runs_through_the_router(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    with routing(tmp_path, CORE_URL=core.base, EDGES=edges(("edge-fra", edge, ["FRA"]))) as router:

        async def session() -> tuple[str | None, str, list[str], dict[str, Any]]:
            # the browser's way to send a key: the subprotocol, which the edge reads and answers with `realtime`
            offered = ["realtime", f"openai-insecure-api-key.{key[1]}"]
            url = f"{router.base.replace('http', 'ws')}/v1/realtime"
            async with connect(url, subprotocols=offered, additional_headers=FRA) as ws:  # type: ignore[arg-type]

                async def event() -> dict[str, Any]:
                    return json.loads(await asyncio.wait_for(ws.recv(), 60))  # type: ignore[no-any-return]

                assert (await event())["type"] == "session.created"
                await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 16}}))
                while (await event())["type"] != "session.updated":
                    pass
                message = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": message}))
                await ws.send(json.dumps({"type": "response.create"}))
                deltas = []
                while (e := await event())["type"] != "response.done":
                    if e["type"] == "response.output_text.delta":
                        deltas.append(e["delta"])
                assert ws.response is not None
                return ws.subprotocol, ws.response.headers["x-blink-router"], deltas, e

        answered, (subprotocol, router_name, deltas, done) = answered_by(
            {"edge": edge, "core": core}, lambda: asyncio.run(session())
        )
        assert (answered, router_name, subprotocol) == ("edge", "edge-fra", "realtime")
        assert len(deltas) > 2 and done["response"]["status"] in ("completed", "incomplete")


def cancels_at(server: Server, leave: Callable[[], None], timeout: float = 20) -> None:
    """Run `leave` (a client leaving mid-answer), then wait until `server` ended one more answer as cancelled: it
    saw the client go (an answer run to its end would be `length`), its 1 s resume window passed."""
    before = responses(server, "cancelled")
    leave()
    deadline = time.monotonic() + timeout
    while responses(server, "cancelled") == before:
        assert time.monotonic() < deadline, f"no answer cancelled within {timeout}s: the client's leaving was lost"
        time.sleep(0.1)


def test_closes_and_disconnects_cross_the_router_both_ways(
    pair: tuple[Server, Server], key: tuple[Path, str], tmp_path: Path
) -> None:
    edge, core = pair
    story = "Write a very long story about the ocean."
    with routing(tmp_path, CORE_URL=core.base, EDGES=edges(("edge", edge, []))) as router:
        url, auth = f"{router.base.replace('http', 'ws')}/v1/realtime", {"Authorization": f"Bearer {key[1]}"}

        async def refused() -> tuple[dict[str, Any], int | None]:  # the edge closes: a model it does not serve
            async with connect(f"{url}?model=nope", additional_headers=auth) as ws:
                error = json.loads(await asyncio.wait_for(ws.recv(), 30))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 30)
            return error, ws.close_code

        error, code = asyncio.run(refused())
        assert error["error"]["code"] == "model_not_found" and code == 1008

        async def close_mid_answer() -> None:  # the client closes its WebSocket after the first delta
            async with connect(url, additional_headers=auth) as ws:
                item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": story}]}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 1500}}))
                while json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] != "response.output_text.delta":
                    pass

        cancels_at(edge, lambda: asyncio.run(close_mid_answer()))

        def drop_sse_mid_answer() -> None:  # the client drops its SSE connection after a few chunks
            ask = {"model": MODEL, "messages": [{"role": "user", "content": story}], "stream": True}
            ask |= {"max_tokens": 1500, "ignore_eos": True}
            with httpx.stream("POST", f"{router.base}/v1/chat/completions", json=ask, headers=auth, timeout=60) as r:
                assert r.headers["x-blink-router"] == "edge"
                chunks = (line for line in r.iter_lines() if line.startswith("data:"))
                for _ in range(4):
                    next(chunks)

        cancels_at(edge, drop_sse_mid_answer)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("EDGES", "[{'name': 'edge'}]"),  # not JSON
        ("EDGES", '{"name": "edge", "url": "http://127.0.0.1:9001"}'),  # not a list
        ("EDGES", '[{"name": "edge", "url": "http://127.0.0.1:9001", "colo": ["FRA"]}]'),  # unknown field
        ("EDGES", '[{"name": "core", "url": "http://127.0.0.1:9001"}]'),  # the core's name
        ("EDGES", '[{"name": "edge", "url": "127.0.0.1:9001"}]'),  # no scheme
        ("CORE_URL", "ftp://127.0.0.1:9000"),
        ("EDGE_MAX_PROMPT_CHARS", "12.5"),
        ("HEALTH_TTL_S", "-1"),
    ],
)
def test_a_bad_setting_is_a_500_json_error_naming_it(setting: str, value: str, tmp_path: Path) -> None:
    settings = {"CORE_URL": "http://127.0.0.1:9000", "EDGES": "[]", setting: value}
    with routing(tmp_path, **settings) as router:
        for method, path in [("GET", "/healthz"), ("POST", "/v1/chat/completions")]:
            reply = httpx.request(method, f"{router.base}{path}", json={"model": MODEL}, timeout=30)
            error = reply.json()["error"]
            assert reply.status_code == 500 and (error["type"], error["code"]) == (
                "server_error",
                "router_misconfigured",
            )
            assert error["message"].startswith(setting), error["message"]


def test_an_unreachable_upstream_is_a_502_json_error(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    with routing(tmp_path, CORE_URL=nobody, EDGES=edges(("edge", f"http://127.0.0.1:{free_port()}", []))) as router:
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
        upgrade["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
        for reply in [
            httpx.post(f"{router.base}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30),
            httpx.get(f"{router.base}/v1/realtime", headers=upgrade, timeout=30),
        ]:
            error = reply.json()["error"]
            assert reply.status_code == 502 and (error["type"], error["code"]) == (
                "server_error",
                "upstream_unreachable",
            )
            assert nobody in error["message"] and reply.headers["x-blink-router"] == "core"
