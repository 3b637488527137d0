"""A gateway (`blink serve --redis ... --no-local-replica`) and a `blink worker` on a Redis that requires a password,
reached over TLS (rediss://, the certificate checked): the password comes from the environment, so it is in
neither process's argv, and neither process logs it (at debug level)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import MODEL, Server
from tests.e2e.test_realtime import ask, recv, until
from tests.e2e.test_semantic_cache import COMPLETES
from tests.redis_server import RedisServer, TlsProxy

pytestmark = pytest.mark.slow


def test_serve_and_worker_use_a_password_protected_redis_over_tls_with_the_password_from_the_environment(
    tmp_path: Path, model_dir: Path
) -> None:
    password = "pw-" + uuid.uuid4().hex
    with RedisServer(password=password) as redis, TlsProxy(redis.port) as tls:
        assert tls.url.startswith("rediss://") and password not in tls.url
        flags = ("--redis", tls.url, "--log-level", "debug")
        gateway = Server(tmp_path / "gateway.log", *flags, "--no-local-replica", env={"REDIS_PASSWORD": password})
        worker_log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "blink.cli", "worker", *flags, "--warmup-steps", "1"],
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BLINK_REDIS_PASSWORD": password},
        )
        try:
            gateway.wait_ready()
            for proc in (gateway.proc, worker):  # what `ps` shows every user of the machine
                assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            # the bus and the semantic cache (Vector Sets) through TLS: a miss, then the stored answer
            question = [{"role": "user", "content": "What is the capital of Italy?"}]
            body = {"model": MODEL, "messages": question, "temperature": 0, "max_tokens": 60, "stop": COMPLETES}
            answers = [httpx.post(f"{gateway.base}/v1/chat/completions", json=body, timeout=60) for _ in range(2)]
            assert [a.status_code for a in answers] == [200, 200], answers[0].text
            assert [a.headers["x-blink-cache"] for a in answers] == ["miss", "hit"]
            assert gateway.readyz()["semantic_cache"]["errors"] == 0

            async def realtime() -> None:  # sessions live in the same Redis: a reconnect finds this one
                async with connect(gateway.ws_url) as ws:
                    session_id = (await recv(ws))["session"]["id"]
                    await ask(ws, "Say hi.", max_output_tokens=4)
                    done, _ = await until(ws, "response.done")
                    assert done["response"]["status"] in ("completed", "incomplete"), done
                async with connect(f"{gateway.ws_url}?session_id={session_id}") as ws:
                    created = await recv(ws)
                    assert created["type"] == "session.created", created
                    assert created["session"]["id"] == session_id

            asyncio.run(realtime())
        finally:
            gateway.stop()
            worker.terminate()
            worker.wait(60)
            worker_log.close()
        for log in (tmp_path / "gateway.log", tmp_path / "worker.log"):
            text = log.read_text(errors="replace")
            assert password not in text, f"{log.name} holds the password"
            assert "Traceback" not in text, text[-3000:]
