"""A replica on the in-memory bus, in-process: the engine loop, cancels and bad requests (no sockets)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blink.bus.memory import MemoryBus
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, ReplicaState, Sampling, TokenEvent
from blink.config import EngineConfig, ModelConfig, default_cache_dir
from blink.worker.replica import Replica

MODEL = "smollm2-135m-instruct"


def with_replica(body: Callable[[MemoryBus, Replica], Awaitable[None]], **engine: Any) -> None:
    async def main() -> None:
        bus = MemoryBus()
        replica = Replica(
            bus,
            ModelConfig(cache_dir=default_cache_dir()),
            EngineConfig(**{"max_num_seqs": 4, "warmup_steps": 1, **engine}),
            progress=False,
        )
        task = asyncio.create_task(replica.run())
        await asyncio.wait_for(replica.ready.wait(), 120)
        assert [r.state for r in bus.replicas()] == [ReplicaState.READY]
        try:
            await body(bus, replica)
        finally:
            await replica.stop()
            await task
        assert replica.state is ReplicaState.STOPPED

    asyncio.run(main())


async def events(bus: MemoryBus, request: GenerateRequest) -> AsyncIterator[object]:
    stream = await bus.submit(request)
    async for event in stream:
        yield event


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_cancel_frees_the_sequence_within_one_step(model_dir: Path) -> None:
    async def body(bus: MemoryBus, replica: Replica) -> None:
        req = GenerateRequest("a", MODEL, Sampling(max_tokens=500, temperature=0.7, seed=1), prompt="Once upon a time")
        it = events(bus, req)
        assert isinstance(await anext(it), Accepted)
        first = await anext(it)
        assert isinstance(first, TokenEvent)
        await bus.cancel("a", MODEL)
        rest = [e async for e in it]
        finished = rest[-1]
        assert isinstance(finished, Finished) and finished.status is FinishStatus.CANCELLED
        # at most the step that was running when the cancel arrived, plus one already on its way
        assert finished.completion_tokens <= first.completion_tokens + 2
        assert replica.engine is not None and replica.engine.num_running == 0 and not replica.engine.has_work()

    with_replica(body)


@pytest.mark.slow  # ~13 s: many requests through a real replica (the fast tier keeps the smaller replica tests)
def test_bad_requests_fail_cleanly_and_the_replica_keeps_serving(model_dir: Path) -> None:
    async def body(bus: MemoryBus, replica: Replica) -> None:
        too_long = GenerateRequest("long", MODEL, Sampling(max_tokens=5), prompt="word " * 5000)
        (finished,) = [e async for e in events(bus, too_long)]
        assert isinstance(finished, Finished) and finished.error_code == "context_length_exceeded"
        empty = GenerateRequest("empty", MODEL, Sampling(max_tokens=5), prompt="")
        (finished,) = [e async for e in events(bus, empty)]
        assert isinstance(finished, Finished) and finished.error_code == "invalid_request"
        ok = GenerateRequest("ok", MODEL, Sampling(max_tokens=5, temperature=0), prompt="Hello")
        got = [e async for e in events(bus, ok)]
        assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.LENGTH
        assert got[-1].completion_tokens == 5
        assert replica.engine is not None and not replica.engine.has_work()

    with_replica(body)


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_a_cancel_that_overtakes_its_request_still_ends_it(model_dir: Path) -> None:
    async def body(bus: MemoryBus, replica: Replica) -> None:
        req = GenerateRequest("early", MODEL, Sampling(max_tokens=50), prompt="Hi")
        stream = await bus.submit(req)
        await bus.cancel("early", MODEL)  # both are queued before the replica's next receive
        got = [e async for e in stream]
        assert isinstance(got[-1], Finished) and got[-1].status is FinishStatus.CANCELLED
        assert replica.engine is not None and not replica.engine.has_work()

    with_replica(body)


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_a_request_past_its_deadline_ends_with_deadline_exceeded_and_frees_its_blocks(model_dir: Path) -> None:
    async def body(bus: MemoryBus, replica: Replica) -> None:
        sampling = Sampling(max_tokens=2000, temperature=0, ignore_eos=True)
        req = GenerateRequest("slow", MODEL, sampling, prompt="Count slowly:", deadline=time.time() + 1.0)
        got = [e async for e in events(bus, req)]
        finished = got[-1]
        assert isinstance(finished, Finished) and finished.status is FinishStatus.ERROR
        assert finished.error_code == "deadline_exceeded" and 0 < finished.completion_tokens < 2000
        engine = replica.engine
        assert engine is not None and not engine.has_work()
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks

    with_replica(body)


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(model_dir: Path) -> None:
    async def body(bus: MemoryBus, replica: Replica) -> None:
        prompt = "The following is a long note about rivers and the towns beside them. " * 8
        cached = []
        for rid in ("cold", "warm"):
            req = GenerateRequest(rid, MODEL, Sampling(max_tokens=3, temperature=0), prompt=prompt)
            finished = [e async for e in events(bus, req)][-1]
            assert isinstance(finished, Finished)
            cached.append(finished.cached_tokens)
        assert cached[0] == 0 and cached[1] > 0 and cached[1] % 16 == 0

    with_replica(body)


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_tenants_share_only_the_declared_system_prompt_and_preload_into_their_own_partition(
    model_dir: Path, tmp_path: Path
) -> None:
    system = "You are the help desk of a bicycle shop. Answer in one short sentence, politely. " * 2
    (tmp_path / "shared.json").write_text(json.dumps([system]))
    messages = ({"role": "system", "content": system}, {"role": "user", "content": "Do you repair wheels? " * 4})

    async def body(bus: MemoryBus, replica: Replica) -> None:
        async def finish(req: GenerateRequest) -> Finished:
            finished = [e async for e in events(bus, req)][-1]
            assert isinstance(finished, Finished) and finished.status is not FinishStatus.ERROR
            return finished

        def chat(rid: str, tenant: str, **kw: Any) -> GenerateRequest:
            return GenerateRequest(rid, MODEL, Sampling(max_tokens=2, temperature=0), messages, tenant=tenant, **kw)

        assert replica.engine is not None and replica.tokenizer is not None
        shared = replica.tokenizer.encode_chat([messages[0]], add_generation_prompt=False)
        a = await finish(chat("a1", "a", affinity="conv-a"))
        assert replica.prefixes.held(replica.engine) == ("conv-a",)
        b = await finish(chat("b1", "b"))
        assert a.cached_tokens == 0 and b.cached_tokens == len(shared) // 16 * 16 > 0  # the system turn only
        again = await finish(chat("a2", "a"))
        assert again.cached_tokens == (again.prompt_tokens - 1) // 16 * 16 > b.cached_tokens
        # a pre-load for tenant c computes c's own blocks: a's and b's are not "already cached" for it
        pre = await finish(chat("c-pre", "c", priority=1, prefill_only=True, session_id="s"))
        assert pre.prompt_tokens > 0
        assert (await finish(chat("c1", "c"))).cached_tokens == again.cached_tokens

    with_replica(body, shared_prefixes=str(tmp_path / "shared.json"))


@pytest.mark.slow  # ~8 s of real model each; the fast tier keeps test_bad_requests_fail_cleanly_*
def test_a_step_running_when_another_tenants_request_arrives_is_called_off_for_it(model_dir: Path) -> None:
    """Tenant a holds every slot; b's request arrives while a's step is in its first layer (held there until the
    request is in): the replica takes it off the bus during the step and calls the step off, and nobody's tokens
    change. Without the replica looking at the bus mid-step, the held step would time out uncalled."""

    async def body(bus: MemoryBus, replica: Replica) -> None:
        engine = replica.engine
        assert engine is not None
        greedy = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
        alone = {}
        for rid in ("a0", "a1", "b0"):
            got = [e async for e in events(bus, GenerateRequest(f"{rid}-alone", MODEL, greedy, prompt=f"Story {rid}:"))]
            alone[rid] = "".join(e.text for e in got if isinstance(e, TokenEvent))
        held, hold = threading.Event(), threading.Event()

        def layer_0(*_: object) -> None:
            if hold.is_set():
                hold.clear()
                held.set()
                engine.runner.interrupt.wait(30)

        a = [events(bus, GenerateRequest(f"a{i}", MODEL, greedy, prompt=f"Story a{i}:", tenant="a")) for i in (0, 1)]
        firsts = []
        for it in a:
            assert isinstance(await anext(it), Accepted)
            firsts.append(await anext(it))
        handle = engine.runner.model.layers[0].register_forward_hook(layer_0)
        # a decode-only step of the q4 model runs its layers in one native call (engine/fused_decode.py): held just
        # before it, the native loop then finds the interrupt set before its first layer
        fused = engine.runner.fused
        native_step = fused.forward if fused is not None else None

        def held_native_step(*args: Any, **kwargs: Any) -> Any:
            layer_0()
            return native_step(*args, **kwargs)  # type: ignore[misc]

        if fused is not None:
            fused.forward = held_native_step  # type: ignore[method-assign]
        try:
            hold.set()
            await asyncio.to_thread(held.wait, 30)
            b = [e async for e in events(bus, GenerateRequest("b0", MODEL, greedy, prompt="Story b0:", tenant="b"))]
            rest = [[e async for e in it] for it in a]
        finally:
            handle.remove()
            if fused is not None:
                fused.forward = native_step  # type: ignore[method-assign]
        assert engine.interrupted_steps == 1
        assert "".join(e.text for e in b if isinstance(e, TokenEvent)) == alone["b0"]
        for i, (first, events_a) in enumerate(zip(firsts, rest, strict=True)):
            assert isinstance(events_a[-1], Finished) and events_a[-1].completion_tokens == 12
            assert "".join(e.text for e in [first, *events_a] if isinstance(e, TokenEvent)) == alone[f"a{i}"]
        assert not engine.has_work()

    with_replica(body, max_num_seqs=2)
