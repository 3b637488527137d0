"""Fuzz a real blink server with generated input; count what must never happen.

WebSocket: events built by hypothesis strategies over the realtime protocol (every client event type, its fields
mostly of the right type and range, sometimes not) and junk (unknown types, JSON of any shape, deep nesting, huge
strings and integers, text that is not JSON, binary frames). HTTP: schemathesis cases from /openapi.json (bodies
that fit the schema and bodies that do not) and raw junk (wrong Content-Type, deep JSON, bytes).

Counted: answers with a 5xx status (HTTP) or code (WebSocket `error` events, failed responses), closes with
1011, tracebacks in the server's log, and leaks: once the clients are gone, the replica must come back to no
running or waiting sequence and no KV block in use (from /readyz, waited for, never slept on). At the end an
ordinary request must still succeed. Seeded: the same seed sends the same input.

    python benchmarks/fuzz.py [--events 100000] [--bodies 3000] [--seed 0] [--max-s 2400]
        [--url http://127.0.0.1:8000 --log server.log]   (default: starts its own `blink serve`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blink.errors import CODES

MODEL = "smollm2-135m-instruct"
SERVER_FLAGS = ("--max-model-len", "96", "--resume-window-s", "1", "--max-request-bytes", "65536")
MAX_BYTES = 65536  # --max-request-bytes of SERVER_FLAGS: events a little over it are refused, not fatal
MAX_TOKENS = 8  # generated requests that may run the model are held to this many tokens: the fuzz stays fast
ANSWER_TIMEOUT_S = 120.0  # an answer slower than this is a hang, reported


class Enough(Exception):
    """The run has sent what it was asked to, or its time is up (stops hypothesis's loop)."""


@dataclass
class Report:
    events: int = 0
    bodies: int = 0
    server_errors: list[str] = field(default_factory=list)  # 5xx answers, internal errors, 1011 closes
    statuses: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    leaked: dict[str, Any] = field(default_factory=dict)  # what /readyz still held after the clients left
    final_request: int = 0  # status of the ordinary request at the end
    seconds: float = 0.0
    ws_seconds: float = 0.0
    http_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.server_errors and not self.tracebacks and not self.leaked and self.final_request == 200

    def summary(self) -> str:
        return (
            f"fuzz: {self.events} WebSocket events ({self.ws_seconds:.0f} s) + {self.bodies} HTTP requests "
            f"({self.http_seconds:.0f} s) = {self.events + self.bodies} in {self.seconds:.0f} s; "
            f"5xx/internal errors: {len(self.server_errors)}; tracebacks: {self.tracebacks}; "
            f"leaks: {self.leaked or 'none'}; final request: {self.final_request}; "
            f"answers: {dict(self.statuses.most_common(12))}"
        )


# -- WebSocket events -----------------------------------------------------------------------------------------
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=8,
)
EVENT_TYPES = (
    "session.update",
    "conversation.item.create",
    "response.create",
    "response.cancel",
    "response.resume",
    "input_text.draft",
    "context.open",
)


def mostly(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`right` three times in four, anything else the fourth."""
    return st.one_of(right, right, right, JUNK)


def optional_fields(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: mostly(s) for k, s in fields.items()})


SETTINGS = optional_fields(
    model=st.sampled_from([MODEL, "no-such-model"]),
    instructions=st.text(max_size=40) | st.none(),
    temperature=st.floats(0, 2) | st.floats(),
    top_p=st.floats(0, 1),
    seed=st.integers(),
    max_output_tokens=st.integers(1, 12) | st.just("inf") | st.integers(),
    retrieval=st.none() | optional_fields(top_k=st.integers(0, 30), document_ids=st.lists(st.text(max_size=8))),
    cache=st.booleans(),
)
PART = optional_fields(type=st.sampled_from(["input_text", "text", "output_text", "image"]), text=st.text())
ITEM = optional_fields(
    type=st.just("message"),
    role=st.sampled_from(["user", "assistant", "system", "tool"]),
    content=st.lists(PART, max_size=3),
    id=st.text(max_size=10),
)
BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "session.update": optional_fields(session=SETTINGS),
    "conversation.item.create": optional_fields(item=ITEM),
    "response.create": optional_fields(response=SETTINGS, traceparent=st.text(max_size=60)),
    "response.cancel": optional_fields(),
    "response.resume": optional_fields(response_id=st.text(max_size=20), after=st.integers(-3, 1 << 40)),
    "input_text.draft": optional_fields(text=st.text(max_size=80), session_id=st.text(max_size=10)),
    "context.open": optional_fields(document_ids=st.lists(st.text(max_size=10), max_size=3)),
}


def _event(kind: str) -> st.SearchStrategy[str]:
    return st.builds(
        lambda body, event_id: json.dumps({"type": kind, **body, **event_id}),
        BODIES[kind],
        optional_fields(event_id=st.text(max_size=10)),
    )


def _deep(depth: int, wrapped: bool) -> str:
    inner = "[" * depth + "]" * depth
    return '{"type": "session.update", "session": {"instructions": ' + inner + "}}" if wrapped else inner


FRAMES: st.SearchStrategy[str | bytes] = st.one_of(
    *(_event(kind) for kind in EVENT_TYPES),
    st.builds(json.dumps, JUNK),  # JSON of any shape
    st.builds(lambda t, body: json.dumps({"type": t, **body}), st.text(max_size=20), optional_fields(x=JUNK)),
    st.builds(_deep, st.integers(1, 200_000), st.booleans()),  # deep nesting
    st.builds(lambda n: json.dumps({"type": "input_text.draft", "text": "x" * n}), st.integers(0, 2 * MAX_BYTES)),
    st.builds(lambda n: '{"type":"response.resume","response_id":"r","after":' + "9" * n + "}", st.integers(1, 9000)),
    st.text(max_size=40),  # not JSON
    st.binary(max_size=64),  # binary frames
)


class Realtime:
    """A sync WebSocket client that sends frames and reads every answer up to a sentinel (an unknown event type
    whose `error` comes after every answer the server gave to the frames before it), reconnecting when the server
    closes. `check` gets each event the server sent."""

    def __init__(self, url: str, report: Report) -> None:
        self.url = url
        self.report = report
        self.ws: Any = None
        self.sent = 0
        self._open = contextlib.ExitStack()  # the connection, closed when the next opens

    def _connect(self) -> None:
        from websockets.sync.client import connect

        self.ws = self._open.enter_context(connect(self.url, max_size=None, open_timeout=30))
        self._read_until(None)
        # short answers (the fuzz may lift the bound, within --max-model-len), to a conversation that has a start
        self.ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": MAX_TOKENS}}))
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}
        self.ws.send(json.dumps({"type": "conversation.item.create", "item": item}))

    def close(self) -> None:
        self._open.close()
        self.ws = None

    def send(self, frames: list[str | bytes]) -> None:
        from websockets.exceptions import ConnectionClosed

        if self.ws is None or self.sent > 300:  # a new session now and then
            self.close()
            self._connect()
            self.sent = 0
        try:
            for frame in frames:
                self.ws.send(frame)
                self.sent += 1
                self.report.events += 1
            marker = f"fuzz-{self.report.events}"
            self.ws.send(json.dumps({"type": "fuzz.sync", "event_id": marker}))
            self._read_until(marker)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            self.report.statuses[f"ws close {code}"] += 1
            if code == 1011:
                self.report.server_errors.append(f"WebSocket closed 1011 after {frames!r:.200}")
            self.close()
        except TimeoutError:
            self.report.server_errors.append(f"no answer within {ANSWER_TIMEOUT_S} s to {frames!r:.200}")
            self.close()

    def _read_until(self, marker: str | None) -> None:
        while True:
            event = json.loads(self.ws.recv(timeout=ANSWER_TIMEOUT_S))
            kind = event.get("type")
            if kind == "error":
                error = event["error"]
                if marker is not None and error.get("event_id") == marker:
                    return
                self.report.statuses[f"ws error {error['code']}"] += 1
                cls = CODES.get(error["code"])
                if cls is None or cls.status >= 500:
                    self.report.server_errors.append(f"error event {error}")
            elif kind == "response.done":
                response = event["response"]
                self.report.statuses[f"ws response {response['status']}"] += 1
                if response["status"] == "failed":
                    self.report.server_errors.append(f"failed response {response.get('status_details')}")
            if marker is None and kind == "session.created":
                return


@contextlib.contextmanager
def quiet_reprs() -> Iterator[None]:
    """Hypothesis warns when it builds the repr of a large generated input (as it does on stopping a run early,
    and more under CI=true, its CI profile); the inputs are large on purpose, and warnings are errors in tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Generating overly large repr", category=HypothesisWarning)
        yield


def fuzz_websocket(url: str, report: Report, events: int, run_seed: int, until: float) -> None:
    client = Realtime(url, report)

    @seed(run_seed)
    @settings(
        max_examples=events,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(frames=st.lists(FRAMES, min_size=1, max_size=6))
    def run(frames: list[str | bytes]) -> None:
        if report.events >= events or time.monotonic() > until:
            raise Enough
        client.send(frames)

    with contextlib.suppress(Enough), quiet_reprs():
        run()
    client.close()


# -- HTTP ---------------------------------------------------------------------------------------------------
JUNK_BODY = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n: b"[" * n, st.integers(1, 200_000)),
    st.builds(lambda n: b'{"model": ' + b"1" * n + b"}", st.integers(1, 9000)),
    st.builds(lambda v: json.dumps(v).encode(), JUNK),
)
CONTENT_TYPES = (
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
    "application/json; charset=latin-1",
)
RAW = st.tuples(
    st.sampled_from(["POST", "GET", "DELETE", "PUT", "PATCH"]),
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/documents", "/v1/cache", "/v1/models", "/x"]),
    st.sampled_from(CONTENT_TYPES),
    JUNK_BODY,
)


def fuzz_http(base: str, report: Report, bodies: int, run_seed: int, until: float) -> None:
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    document = httpx.get(f"{base}/openapi.json", timeout=30).json()
    max_tokens = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    limit = next(s["maximum"] for s in max_tokens.get("anyOf", [max_tokens]) if "maximum" in s)  # or null
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    cases = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode))
    session = requests.Session()
    raw_client = httpx.Client(base_url=base, timeout=120)

    def record(label: str, status: int, text: str) -> None:
        report.bodies += 1
        report.statuses[f"http {status}"] += 1
        if status >= 500:
            report.server_errors.append(f"{label} -> {status} {text[:200]}")

    @seed(run_seed)
    @settings(
        max_examples=bodies,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(cases, cases, cases, RAW))
    def run(case: Any) -> None:
        if report.bodies >= bodies or time.monotonic() > until:
            raise Enough
        if isinstance(case, tuple):
            method, path, content_type, body = case
            headers = {"Content-Type": content_type} if content_type else {}
            response = raw_client.request(method, path, content=body, headers=headers)
            record(f"{method} {path} [{content_type}] {body[:80]!r}", response.status_code, response.text)
        else:
            _bound_generation(case.body, limit)
            response = case.call(base_url=base, session=session, timeout=120)
            record(case.as_curl_command(), response.status_code, response.text)

    with contextlib.suppress(Enough), quiet_reprs():
        run()
    raw_client.close()


def _bound_generation(body: Any, limit: int) -> None:
    """Hold a generated body's token count to MAX_TOKENS where it is a valid one (invalid ones stay as they are):
    the fuzz is about what the gateway takes, not about how long the model talks."""
    if not isinstance(body, dict):
        return
    keys = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    for key in keys:
        value = body[key]
        if isinstance(value, int) and not isinstance(value, bool) and MAX_TOKENS < value <= limit:
            body[key] = MAX_TOKENS
    if not keys:
        body["max_tokens"] = MAX_TOKENS


# -- the run ------------------------------------------------------------------------------------------------
def wait_released(base: str, timeout: float = 60) -> dict[str, Any]:
    """Wait until a heartbeat sent from now on shows no sequence, no KV block in use and no active response;
    what was still held at the timeout (empty: nothing)."""
    since, deadline = time.time(), time.monotonic() + timeout
    held: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = httpx.get(f"{base}/readyz", timeout=10).json()
        fresh = all(r["heartbeat_at"] > since for r in state["replicas"])
        held = {
            key: total
            for key in ("running", "waiting", "kv_blocks_in_use")
            if (total := sum(r[key] for r in state["replicas"]))
        }
        if state["active_responses"]:
            held["active_responses"] = state["active_responses"]
        if fresh and not held:
            return {}
        time.sleep(0.2)
    return held


def fuzz(base: str, log: Callable[[], str], events: int, bodies: int, run_seed: int, max_s: float) -> Report:
    """Send `events` WebSocket frames (in examples of 1-6) and `bodies` HTTP requests, stopping at `max_s`."""
    report = Report()
    started = time.monotonic()
    until = started + max_s
    ws_url = base.replace("http", "ws", 1) + "/v1/realtime"
    fuzz_websocket(ws_url, report, events, run_seed, until - max_s * 0.4 if bodies else until)
    report.ws_seconds = time.monotonic() - started
    if bodies:
        fuzz_http(base, report, bodies, run_seed, until)
    report.http_seconds = time.monotonic() - started - report.ws_seconds
    report.leaked = wait_released(base)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "cache": False}
    report.final_request = httpx.post(f"{base}/v1/chat/completions", json=ask, timeout=120).status_code
    report.tracebacks = log().count("Traceback")
    report.seconds = time.monotonic() - started
    return report


@contextlib.contextmanager
def own_server(log_path: Path) -> Iterator[tuple[str, Callable[[], str]]]:
    from tests.e2e.conftest import serving

    with serving(log_path, *SERVER_FLAGS) as server:
        yield server.base, lambda: server.log_path.read_text(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="WebSocket frames to send (about)")
    parser.add_argument("--bodies", type=int, default=3_000, help="HTTP requests to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-s", type=float, default=2400, help="stop sending after this long")
    parser.add_argument("--url", default="", help="fuzz this server (default: start one)")
    parser.add_argument("--log", default="", help="the --url server's log, searched for tracebacks")
    args = parser.parse_args()
    # the client library logs a server's abrupt close (1009, over ws_max_size) as its own error: counted instead
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    with contextlib.ExitStack() as stack:
        if args.url:
            base, log = args.url.rstrip("/"), (lambda: Path(args.log).read_text() if args.log else "")
        else:
            base, log = stack.enter_context(own_server(Path("fuzz-server.log")))
        report = fuzz(base, log, args.events, args.bodies, args.seed, args.max_s)
    for line in report.server_errors[:20]:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
