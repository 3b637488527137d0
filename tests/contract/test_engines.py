"""The engine contract, run against every engine a replica can drive: what the gateway sees on the bus from a replica
of blink's own engine (worker/replica.py), from one driving an OpenAI-compatible upstream (worker/upstream.py with
engines/openai.py, the upstream a real `blink serve` process on 127.0.0.1), and (opt-in: make install-vllm,
pytest -m vllm) from one driving vLLM's AsyncLLM (engines/vllm.py, the default model exported as a Hugging Face
folder). Each replica runs on the in-memory bus in a loop of its own thread, shared by the module's tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from blink.bus.memory import MemoryBus
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, Sampling, TokenEvent
from blink.config import EngineConfig, ModelConfig, default_cache_dir
from blink.worker.engines.openai import OpenAIUpstream
from blink.worker.replica import Replica
from blink.worker.upstream import UpstreamReplica
from tests.e2e.conftest import MODEL, VLLM_TEST_ARGS, serving

pytestmark = pytest.mark.slow
T = TypeVar("T")

CHAT = ({"role": "user", "content": "Tell me about the sea."},)


class Harness:
    """A bus and a replica on an event loop in a thread; `call` runs a coroutine there. `idle()` says whether the
    engine itself holds no request (blink: its scheduler; openai: the upstream server's own /readyz)."""

    def __init__(self, make: Callable[[MemoryBus], Replica | UpstreamReplica], idle: Callable[[], bool]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.idle = idle
        self.bus = MemoryBus()
        self.replica = make(self.bus)
        self.task = self.call(self._start())

    async def _start(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self.replica.run())
        ready = asyncio.create_task(self.replica.ready.wait())
        await asyncio.wait([task, ready], timeout=170, return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # the engine did not start: its own error
            ready.cancel()
            task.result()
        assert ready.done(), "the replica was not ready in time"
        return task

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 180) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def events(self, request: GenerateRequest, *, cancel_after: int = 0) -> list[object]:
        """Every event of `request`; with `cancel_after`, a Cancel once that many TokenEvents came."""

        async def go() -> list[object]:
            out: list[object] = []
            async for event in await self.bus.submit(request):
                out.append(event)
                if cancel_after and sum(isinstance(e, TokenEvent) for e in out) == cancel_after:
                    await self.bus.cancel(request.request_id, MODEL)
            return out

        return self.call(go())

    def close(self) -> None:
        async def stop() -> None:
            await self.replica.stop()
            await self.task

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=["blink", "openai", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with contextlib.ExitStack() as stack:
        if request.param == "vllm":
            from blink.worker.engines.vllm import VLLMEngine

            vllm = VLLMEngine(
                request.getfixturevalue("hf_model_dir"),
                max_model_len=512,
                max_num_seqs=4,
                kv_cache_mb=128,
                extra_args=VLLM_TEST_ARGS,
            )

            def vllm_idle() -> bool:  # vLLM's own count of the requests it has not finished
                return vllm._llm is not None and vllm._llm.get_num_unfinished_requests() == 0

            harness = Harness(lambda bus: UpstreamReplica(bus, vllm, MODEL), vllm_idle)
        elif request.param == "blink":
            config = EngineConfig(max_num_seqs=4, warmup_steps=1, max_model_len=512)
            harness = Harness(
                lambda bus: Replica(bus, ModelConfig(cache_dir=default_cache_dir()), config, progress=False),
                lambda: harness.replica.engine is not None and not harness.replica.engine.has_work(),  # type: ignore[union-attr]
            )
        else:
            log = tmp_path_factory.mktemp("upstream") / "serve.log"
            flags = ("--no-semantic-cache", "--resume-window-s", "0", "--max-model-len", "512")
            upstream = stack.enter_context(serving(log, *flags))

            def idle() -> bool:
                state = httpx.get(f"{upstream.base}/readyz", timeout=5).json()
                return state["active_responses"] == 0 and all(r["running"] == 0 for r in state["replicas"])

            harness = Harness(lambda bus: UpstreamReplica(bus, OpenAIUpstream(upstream.base), MODEL), idle)
        try:
            yield harness
        finally:
            harness.close()


_ids = iter(range(1_000_000))


def request(**fields: Any) -> GenerateRequest:
    fields.setdefault("messages", CHAT)
    sampling = fields.pop("sampling", Sampling(max_tokens=12, temperature=0, ignore_eos=True))
    return GenerateRequest(f"r{next(_ids)}", MODEL, sampling, **fields)


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_request_is_accepted_streams_text_and_ends_with_its_usage(engine: Harness) -> None:
    events = engine.events(request())
    assert isinstance(events[0], Accepted)
    tokens = [e for e in events[1:-1] if isinstance(e, TokenEvent)]
    assert tokens and "".join(t.text for t in tokens).strip()
    assert [t.index for t in tokens] == list(range(len(tokens)))  # numbered, nothing missing or twice
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.LENGTH
    assert end.prompt_tokens > 0 and end.completion_tokens == 12


def test_greedy_answers_are_the_same_each_time(engine: Harness) -> None:
    def text(events: list[object]) -> str:
        return "".join(e.text for e in events if isinstance(e, TokenEvent))

    assert text(engine.events(request())) == text(engine.events(request()))


def test_a_stop_string_ends_the_answer_before_it(engine: Harness) -> None:
    free = "".join(e.text for e in engine.events(request()) if isinstance(e, TokenEvent))
    stop = free.strip().split()[1]  # a word the free answer has
    events = engine.events(request(sampling=Sampling(max_tokens=12, temperature=0, stop=(stop,))))
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.STOP
    assert stop not in "".join(e.text for e in events if isinstance(e, TokenEvent))


def test_a_cancel_ends_the_request_and_the_engine_lets_it_go(engine: Harness) -> None:
    long = Sampling(max_tokens=400, temperature=0, ignore_eos=True)
    events = engine.events(request(sampling=long), cancel_after=2)
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.CANCELLED
    assert sum(isinstance(e, TokenEvent) for e in events) < 400
    wait_until(engine.idle)


def test_a_prompt_past_the_context_is_an_error_with_its_code(engine: Harness) -> None:
    events = engine.events(request(messages=({"role": "user", "content": "sea " * 2000},)))
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.ERROR
    assert end.error_code == "context_length_exceeded"
    assert not any(isinstance(e, TokenEvent) for e in events)


def test_a_preload_ends_without_text(engine: Harness) -> None:
    draft = request(messages=CHAT, prefill_only=True, open_last=True, priority=1)
    events = engine.events(draft)
    assert not any(isinstance(e, TokenEvent) for e in events)
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.STOP


def test_a_request_whose_deadline_passed_is_not_answered(engine: Harness) -> None:
    events = engine.events(request(deadline=time.time() - 1))
    end = events[-1]
    assert isinstance(end, Finished) and end.status is FinishStatus.ERROR and end.error_code == "deadline_exceeded"
    assert not any(isinstance(e, TokenEvent) for e in events)
