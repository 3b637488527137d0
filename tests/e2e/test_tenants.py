"""Tenant isolation through a real `blink serve` with API keys, on both bus transports (memory and Redis), with the
prefix cache and the semantic cache on: a seeded random mix of 2-5 tenants storing documents (ids that collide
across tenants), typing drafts (pre-loads), asking identical questions, and probing each other's sessions and
responses. Every cross-tenant read, KV reuse or cache hit is counted; the test wants 0."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from blink.gateway.keys import KeyFile
from tests.e2e.conftest import MODEL, Server
from tests.e2e.test_realtime import recv, until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

WORDS = [
    "amber",
    "basalt",
    "cobalt",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
    "meadow",
    "nectar",
]
# long enough for several whole KV blocks (16 tokens each), so a reuse would show in cached_tokens
PREAMBLE = "You answer questions about the project notes below in one short sentence. " * 4


@dataclass
class Tally:
    cross: list[str] = field(default_factory=list)  # every cross-tenant leak seen
    checks: int = 0

    def expect(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok:
            self.cross.append(what)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(srv: Server, key: str, question: str, system: str | None = None) -> httpx.Response:
    """A chat completion. By default the question also opens the system message, so two different questions share
    no KV block (not even the template's first): a tenant's first sight of a question can only be cold."""
    system = f"{question}\n{PREAMBLE}" if system is None else system
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 6,
    }
    return httpx.post(f"{srv.base}/v1/chat/completions", json=body, headers=auth(key), timeout=120)


async def session(srv: Server, key: str, url_suffix: str = "") -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(srv.ws_url + url_suffix, additional_headers=auth(key))
    return ws, await recv(ws)


async def type_and_ask(srv: Server, key: str, question: str) -> tuple[str, str]:
    """A user of `key` types `question` word by word (drafts pre-load it), submits; (session id, response id)."""
    ws, created = await session(srv, key)
    async with ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": PREAMBLE, "temperature": 0}}))
        await until(ws, "session.updated")
        words = question.split()
        for i in range(1, len(words) + 1):
            await ws.send(json.dumps({"type": "input_text.draft", "text": " ".join(words[:i])}))
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await until(ws, "conversation.item.done")
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 6}}))
        done, _ = await until(ws, "response.done")
        return created["session"]["id"], done["response"]["id"]


async def probe_session_and_response(srv: Server, key: str, session_id: str, response_id: str) -> tuple[str, str]:
    """The error codes another key gets for a session id and a response id that are not its own."""
    ws, first = await session(srv, key, f"?session_id={session_id}")
    async with ws:
        session_code = first.get("error", {}).get("code", "opened")
    ws, _ = await session(srv, key)
    async with ws:
        await ws.send(json.dumps({"type": "response.resume", "response_id": response_id, "after": -1}))
        event = await recv(ws)
        resume_code = event.get("error", {}).get("code", event["type"])
    return session_code, resume_code


def run_mix(srv: Server, keys: dict[str, str], rng: random.Random, tally: Tally) -> None:
    tenants = list(keys)
    docs = f"{srv.base}/v1/documents"
    secrets_of: dict[str, str] = {}
    for tenant in tenants:  # the same document id for everyone, each with its own secret
        secrets_of[tenant] = f"{tenant} code word {rng.choice(WORDS)}-{rng.randrange(10**6)}"
        text = f"Notes of {tenant}. The code word is {secrets_of[tenant]}."
        assert httpx.post(docs, json={"id": "notes", "text": text}, headers=auth(keys[tenant]), timeout=60).is_success
    for tenant in tenants:
        listed = httpx.get(docs, headers=auth(keys[tenant]), timeout=30).json()["data"]
        tally.expect([d["id"] for d in listed] == ["notes"], f"{tenant} lists {listed}")
        text = httpx.get(f"{docs}/notes", headers=auth(keys[tenant]), timeout=30).json()["text"]
        others = [s for t, s in secrets_of.items() if t != tenant]
        tally.expect(secrets_of[tenant] in text and not any(s in text for s in others), f"{tenant} read {text!r}")
    # identical questions, in random order: each tenant's first sight of a question is cold and a cache miss
    questions = [f"What is the {rng.choice(WORDS)} {rng.choice(WORDS)} plan number {i}?" for i in range(4)]
    asked: set[tuple[str, str]] = set()
    for _ in range(3 * len(tenants)):
        tenant, question = rng.choice(tenants), rng.choice(questions)
        reply = chat(srv, keys[tenant], question)
        assert reply.status_code == 200, reply.text
        cached = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        if (tenant, question) not in asked:
            tally.expect(cached == 0, f"{tenant} reused {cached} cached tokens of another tenant")
            tally.expect(reply.headers["x-blink-cache"] == "miss", f"{tenant} cache {reply.headers['x-blink-cache']}")
        asked.add((tenant, question))
    # a user types (pre-loads) and asks; another tenant asks the same: no KV, no cache, no session, no resume
    owner, other = rng.sample(tenants, 2)
    question = f"Which {rng.choice(WORDS)} route does the {rng.choice(WORDS)} team take on Friday?"
    session_id, response_id = asyncio.run(type_and_ask(srv, keys[owner], question))
    reply = chat(srv, keys[other], question, system=PREAMBLE)  # the very prompt the owner's session built
    tally.expect(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, f"{other} reused a pre-load")
    mine = chat(srv, keys[owner], question, system=PREAMBLE)  # the owner's own blocks are found: the check can fail
    tally.expect(mine.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, f"{owner} found no own KV")
    codes = asyncio.run(probe_session_and_response(srv, keys[other], session_id, response_id))
    tally.expect(codes == ("session_not_found", "response_not_found"), f"{other} probing {owner}: {codes}")
    for tenant in tenants:
        deleted = httpx.delete(f"{docs}/notes", headers=auth(keys[tenant]), timeout=30)
        tally.expect(deleted.status_code == 200, f"{tenant} could not delete its own document")
        again = httpx.delete(f"{docs}/notes", headers=auth(keys[tenant]), timeout=30)
        tally.expect(again.status_code == 404, f"{tenant} deleted another tenant's document")


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    rng = random.Random(17)
    keys = KeyFile(tmp_path / "keys.json")
    tenants = [f"tenant{i}" for i in range(rng.randint(2, 5))]
    yield keys.path, {t: keys.add(t)[1] for t in tenants}


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_no_tenant_reads_reuses_or_hits_another_tenants_data(
    transport: str, keyed: tuple[Path, dict[str, str]], tmp_path: Path, model_dir: Path
) -> None:
    path, keys = keyed
    with RedisServer() if transport == "redis" else _nothing() as redis:
        flags = ["--api-keys", str(path), "--speculative", "off"]
        if redis is not None:
            flags += ["--redis", redis.url]
        srv = Server(tmp_path / "serve.log", *flags)
        try:
            srv.wait_ready()
            tally = Tally()
            run_mix(srv, keys, random.Random(f"{transport}-mix"), tally)
            print(f"{transport}: {len(keys)} tenants, {tally.checks} checks, {len(tally.cross)} cross-tenant")
            assert tally.cross == []
            assert tally.checks >= 20
            srv.wait_idle()  # nothing leaked: every sequence freed
            assert "Traceback" not in srv.log()
        finally:
            srv.stop()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
