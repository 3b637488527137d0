"""A real `blink serve` process on 127.0.0.1, shared by the end-to-end tests of one session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blink.bench.netem import Proxy
from tests.redis_server import free_port

MODEL = "smollm2-135m-instruct"
# --engine vllm in tests (opt-in, pytest -m vllm): vLLM starts in seconds without torch.compile's minutes of
# warm-up (its answers are the same)
VLLM_TEST_ARGS = {"compilation_config": {"mode": 0}}
VLLM_FLAGS = ("--engine", "vllm", "--vllm-args", json.dumps(VLLM_TEST_ARGS), "--max-model-len", "1024")


class Server:
    def __init__(self, log_path: Path, *flags: str, env: dict[str, str] | None = None, command: str = "serve") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        self.log_path = log_path
        self._log = log_path.open("wb")
        cmd = [sys.executable, "-m", "blink.cli", command, "--port", str(self.port), "--warmup-steps", "1", *flags]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log()}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log()}")

    def readyz(self) -> dict[str, Any]:
        return json.loads(httpx.get(f"{self.base}/readyz", timeout=5).text)  # type: ignore[no-any-return]

    def wait_idle(self, timeout: float = 15) -> dict[str, Any]:
        """Wait until a heartbeat sent from now on reports no running or waiting sequence in the replica."""
        since = time.time()
        deadline = time.monotonic() + timeout
        state = self.readyz()
        while time.monotonic() < deadline:
            state = self.readyz()
            fresh = all(r["heartbeat_at"] > since for r in state["replicas"])
            busy = sum(r["running"] + r["waiting"] for r in state["replicas"]) + state["active_responses"]
            if fresh and busy == 0:
                return state
            time.sleep(0.2)
        raise AssertionError(f"sequences still held after {timeout}s: {state}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class ProxyThread:
    """blink.bench.netem's proxy (a link a test can cut) on a loop of its own, for synchronous tests."""

    def __init__(self, target_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = Proxy("127.0.0.1", target_port)
        self._call(self.proxy.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def cut(self, mode: str) -> None:
        self.loop.call_soon_threadsafe(self.proxy.cut, mode)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.restore)

    def close(self) -> None:
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serving(log_path: Path, *flags: str) -> Iterator[Server]:
    """A `blink serve` with `flags`, ready when this yields it, stopped after."""
    srv = Server(log_path, *flags)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    # a short resume window: the tests that drop a stream check that its generation then stops
    with serving(
        tmp_path_factory.mktemp("server") / "serve.log", "--max-num-seqs", "16", "--resume-window-s", "3"
    ) as srv:
        yield srv
