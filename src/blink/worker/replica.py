"""A replica: load → warm up → READY, then the engine loop.

    LOADING ──▶ WARMING ──▶ READY ──▶ DRAINING ──▶ STOPPED     (any state ──▶ STOPPED on failure)

The loop alternates between taking work from the bus (requests, cancels) and one `engine.step()` on the
replica's own engine thread, so a cancel that arrives during a step frees its sequence before the next one.
While a step runs the loop keeps taking work off the bus (every `bus.step_poll_s`), held until the step ends; a
live request that fairness.py's rule 3 will give a step of its own calls the running step off
(`engine.interrupt_for`), so one tenant's long flood steps don't hold another tenant's first token back.
Every torch call (load, warm-up, steps) runs on that one thread: torch's OpenMP pool belongs to the thread that
uses it, and hopping between executor threads measured ~45% slower decode steps on 2 cores. The replica never
waits on a client: a slow or vanished consumer makes `publish` return False and the request is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from blink.bus.base import Bus
from blink.bus.messages import (
    Accepted,
    Cancel,
    Finished,
    FinishStatus,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    TokenEvent,
    WorkMessage,
)
from blink.config import EngineConfig, ModelConfig, parse_speculative
from blink.engine.llm_engine import LLMEngine, StepOutput
from blink.engine.sequence import FinishReason, SamplingParams
from blink.engine.speculative import DraftModelProposer, NgramProposer, Proposer
from blink.errors import BlinkError, ContextLengthExceeded, InvalidRequest
from blink.models import loader, native, quant, registry
from blink.models.llama import LlamaModel
from blink.models.tokenizer import Tokenizer
from blink.telemetry import tracing
from blink.worker import shared_prefixes
from blink.worker.load import LoadEstimator, Queue
from blink.worker.output import TextOutput
from blink.worker.prompt import prompt_ids

log = logging.getLogger("blink.worker")
T = TypeVar("T")

_TRANSITIONS = {
    ReplicaState.LOADING: {ReplicaState.WARMING, ReplicaState.STOPPED},
    ReplicaState.WARMING: {ReplicaState.READY, ReplicaState.STOPPED},
    ReplicaState.READY: {ReplicaState.DRAINING, ReplicaState.STOPPED},
    ReplicaState.DRAINING: {ReplicaState.STOPPED},
    ReplicaState.STOPPED: set(),
}
_REMEMBERED_CANCELS = 10_000
REMEMBERED_PREFIXES = 1024  # affinity keys of recent requests, checked against the prefix cache at each heartbeat
HEARTBEAT_PREFIXES = 128  # the most a heartbeat reports
_FINISH_STATUS = {FinishReason.STOP: FinishStatus.STOP, FinishReason.LENGTH: FinishStatus.LENGTH}


@dataclass
class _Active:
    request: GenerateRequest
    output: TextOutput
    events: int = 0
    first_token: float | None = None
    marks: dict[str, float] | None = None  # unix times for the trace (received, queued_s, first token, ...)


class Replica:
    def __init__(
        self,
        bus: Bus,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        replica_id: str | None = None,
        heartbeat_s: float = 1.0,
        progress: bool = True,
    ) -> None:
        self.bus = bus
        self.model_config = model
        self.engine_config = engine
        self.model_name = model.model
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self.heartbeat_s = heartbeat_s
        self.progress = progress
        self.state = ReplicaState.LOADING
        self.engine: LLMEngine | None = None
        self.tokenizer: Tokenizer | None = None
        self._active: dict[str, _Active] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._preloads: dict[str, str] = {}  # session id -> its pre-load's request id, while it runs
        # affinity key -> its request's tenant and its prompt's first block (+1)
        self._prefixes: OrderedDict[str, tuple[str | None, list[int]]] = OrderedDict()
        self._stopping = asyncio.Event()
        self._inbox: list[WorkMessage] = []  # taken off the bus while a step ran: started after it
        self.load = LoadEstimator()  # prefill and finish rates of live requests: the queue wait heartbeats carry
        self._drain_until = 0.0  # monotonic time a stopping replica stops finishing its requests
        self.ready = asyncio.Event()  # set once the model is loaded and warmed
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blink-engine")

    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn)

    # lifecycle -----------------------------------------------------------------------------------------
    async def _set_state(self, new: ReplicaState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"replica {self.replica_id}: illegal transition {self.state.value} -> {new.value}")
        self.state = new
        log.info("replica %s: %s", self.replica_id, new.value)
        await self._heartbeat()

    async def _heartbeat(self) -> None:
        engine = self.engine
        await self.bus.heartbeat(
            ReplicaStatus(
                replica_id=self.replica_id,
                model=self.model_name,
                state=self.state,
                running=engine.num_running if engine else 0,
                waiting=engine.num_waiting if engine else 0,
                max_model_len=engine.max_model_len if engine else 0,
                kv_blocks_in_use=engine.blocks.num_blocks - engine.blocks.num_free_blocks if engine else 0,
                kv_blocks_total=engine.blocks.num_blocks if engine else 0,
                background_prefill_tokens=engine.background_prefill_tokens if engine else 0,
                interrupted_steps=engine.interrupted_steps if engine else 0,
                background_tokens_used=engine.scheduler.background_tokens_used if engine else 0,
                speculative=self.engine_config.speculative,
                spec_proposed=engine.speculation.proposed if engine else 0,
                spec_accepted=engine.speculation.accepted if engine else 0,
                queue_wait_s=self._queue_wait() if engine else 0.0,
                prefixes=self._held_prefixes() if engine else (),
            )
        )

    def _remember_prefix(self, req: GenerateRequest, prompt: list[int]) -> None:
        assert self.engine is not None
        bs = self.engine.blocks.block_size
        if req.affinity is None or len(prompt) <= bs:
            return
        self._prefixes[req.affinity] = (req.tenant, prompt[: bs + 1])
        self._prefixes.move_to_end(req.affinity)
        while len(self._prefixes) > REMEMBERED_PREFIXES:
            self._prefixes.popitem(last=False)

    def _held_prefixes(self) -> tuple[str, ...]:
        """The affinity keys (newest first, at most HEARTBEAT_PREFIXES) whose prompt's first block is still in
        the prefix cache: a request with that key (of the same tenant) would find it there. Each is looked up in
        its own tenant's partition, so another tenant's blocks never make a key look held."""
        assert self.engine is not None
        held = []
        for key, (tenant, tokens) in reversed(self._prefixes.items()):
            if self.engine.cached_tokens(tokens, tenant):
                held.append(key)
                if len(held) == HEARTBEAT_PREFIXES:
                    break
        return tuple(held)

    def _queue_wait(self) -> float:
        assert self.engine is not None
        pending, waiting, free = self.engine.live_backlog()
        return round(self.load.wait_s(Queue(pending, waiting, free)), 3)

    async def run(self) -> None:
        """Load, warm up, serve until `stop()`. Returns when stopped; raises if loading fails."""
        await self._heartbeat()
        # heartbeats from the start: a gateway whose response lost its replica waits for one that is still
        # loading or warming (a replacement) only while it hears from it
        beat = asyncio.create_task(self._beat())
        try:
            await self._on_engine_thread(self._load)
            await self._set_state(ReplicaState.WARMING)
            await self._on_engine_thread(self._warm_up)
            await self._set_state(ReplicaState.READY)
            self.ready.set()
            await self._loop()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # before STOPPED: no older heartbeat lands after it
                await beat
            await self._release()
            if self.state is not ReplicaState.STOPPED:
                await self._set_state(ReplicaState.STOPPED)
            self._engine_thread.shutdown(wait=False)

    async def _release(self) -> None:
        """The requests still held when the replica stops: handed back (the bus re-delivers them once this
        replica's STOPPED heartbeat is out; nothing is published, so their clients' streams stay open), or, on a
        bus that cannot, ended as cancelled. So are those taken off the bus during the last step."""
        held = [m for m in self._inbox if isinstance(m, GenerateRequest)]
        self._inbox = []
        if not (self.bus.reclaims and self._stopping.is_set()):
            for req in held:
                await self.bus.publish(Finished(req.request_id, FinishStatus.CANCELLED))
        if not self._active:
            return
        if self.engine is not None and self.bus.reclaims and self._stopping.is_set():
            handed = 0
            for request_id, active in list(self._active.items()):
                if active.request.prefill_only:  # background work: not worth a restart elsewhere
                    await self._drop(request_id, FinishStatus.CANCELLED)
                else:
                    self.engine.abort(request_id)
                    del self._active[request_id]
                    handed += 1
            log.info("replica %s: handed back %d request(s) to the pool", self.replica_id, handed)
            return
        for request_id in list(self._active):
            await self._drop(request_id, FinishStatus.CANCELLED)

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking work (DRAINING) and finish the requests in flight for up to `drain_s` seconds. What is left
        then is handed back when the bus re-delivers a stopped replica's requests (Redis: another replica claims
        and restarts them, and the gateway continues each client's text where it was); otherwise it ends as
        cancelled. Returns at once; `run()` returns when the replica has stopped."""
        self._drain_until = time.monotonic() + drain_s
        if self.state is ReplicaState.READY:
            await self._set_state(ReplicaState.DRAINING)
        self._stopping.set()

    def _load(self) -> None:
        spec = registry.get(self.model_name)
        folder = loader.prepare(spec, self.model_config.cache_dir, progress=self.progress)
        model, self.tokenizer = loader.load(folder)
        calibration = self.tokenizer.encode(quant.CALIBRATION_TEXT)
        quant.convert(model, self.engine_config.weights, calibration, native_kernels=self.engine_config.native_kernels)
        if self.engine_config.weights == "w8a8":
            kernel = native.describe() if self.engine_config.native_kernels else "torch ops (--no-native-kernels)"
            log.info("replica %s: w8a8 layers run on %s", self.replica_id, kernel)
        proposer = self._proposer(model)
        path = self.engine_config.shared_prefixes
        shared = shared_prefixes.tokenize(shared_prefixes.read(path), self.tokenizer) if path else []
        self.engine = LLMEngine(
            model, self.tokenizer.stop_token_ids, self.engine_config, proposer=proposer, shared_prefixes=shared
        )

    def _proposer(self, target: LlamaModel) -> Proposer | None:
        """The --speculative proposer: none, prompt lookup, or a draft model loaded like the target."""
        assert self.tokenizer is not None
        kind, draft_name = parse_speculative(self.engine_config.speculative)
        if kind == "off":
            return None
        if kind == "ngram":
            return NgramProposer()
        spec = registry.get(draft_name)
        folder = loader.prepare(spec, self.model_config.cache_dir, progress=self.progress)
        draft, draft_tokenizer = loader.load(folder)
        if draft_tokenizer.tokens != self.tokenizer.tokens:
            raise ValueError(
                f"draft model {draft_name!r} has another vocabulary than {self.model_name!r}: speculative decoding "
                "needs the same tokenizer"
            )
        calibration = draft_tokenizer.encode(quant.CALIBRATION_TEXT)
        quant.convert(draft, self.engine_config.weights, calibration, native_kernels=self.engine_config.native_kernels)
        return DraftModelProposer(draft, self.engine_config, vocab_size=target.config.vocab_size)

    def _warm_up(self) -> None:
        # first calls of each kernel and shape allocate and tune; pay that before taking traffic
        assert self.engine is not None and self.tokenizer is not None
        prompt = self.tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
        for i in range(self.engine_config.warmup_steps):
            for j in range(2):  # two at once so the batched decode path is warm too
                self.engine.add_request(f"warmup-{i}-{j}", prompt, SamplingParams(max_tokens=8, temperature=0))
            while self.engine.has_work():
                self.engine.step()
        # one step as large as the budget allows: its activations are the largest a step makes, so resident
        # memory reaches its working size (weights + activations; the KV pool grows within --kv-cache-mb) now
        cfg = self.engine_config
        longest = min(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
        filler = (prompt * (longest // len(prompt) + 1))[:longest]
        self.engine.add_request("warmup-full", filler, SamplingParams(max_tokens=1, temperature=0))
        while self.engine.has_work():
            self.engine.step()
        if self.engine.proposer is not None:  # the speculation policy decides from this machine's step costs
            costs = self.engine.measure_step_cost()  # only sizes the KV pool holds
            self.engine.speculation.reset()
            log.info(
                "replica %s: decode step costs (sequences x rows: ms) %s",
                self.replica_id,
                {k: round(v * 1000, 1) for k, v in costs.items()},
            )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat()

    # the loop ------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        engine = self.engine
        assert engine is not None
        while not self._stopping.is_set() or (self._active and time.monotonic() < self._drain_until):
            work, self._inbox = self._inbox, []
            work += await self.bus.receive(
                self.model_name,
                self.replica_id,
                wait=0 if engine.has_work() or work else 0.2,
                max_requests=self._room(engine, work),
            )
            for msg in work:
                if isinstance(msg, Cancel):
                    await self._cancel(msg.request_id)
                else:
                    await self._start(msg)
            if not engine.has_work():
                continue
            try:
                outputs = await self._step(engine)
            except Exception as exc:  # a bug or resource failure in one step must not kill the replica
                log.exception("engine step failed")
                for request_id in list(self._active):
                    await self._drop(request_id, FinishStatus.ERROR, error=f"engine step failed: {exc}")
                continue
            for out in outputs:
                await self._emit(out)

    def _room(self, engine: LLMEngine, held: list[WorkMessage]) -> int:
        """New requests to take off the bus: only what the engine can start soon (the rest stays on the bus,
        where the gateway's --max-pending-requests bound applies and another replica may take it); none while
        draining (cancels still reach it)."""
        if self._stopping.is_set():
            return 0
        waiting = engine.num_waiting + sum(1 for m in held if isinstance(m, GenerateRequest))
        return max(0, self.engine_config.max_num_seqs - waiting)

    async def _step(self, engine: LLMEngine) -> list[StepOutput]:
        """One engine step, taking work off the bus meanwhile (held in the inbox until it ends)."""
        step = asyncio.ensure_future(self._on_engine_thread(engine.step))
        poll = self.bus.step_poll_s
        while not (await asyncio.wait({step}, timeout=poll))[0]:
            work = await self.bus.receive(
                self.model_name, self.replica_id, wait=0, max_requests=self._room(engine, self._inbox)
            )
            self._inbox += work
            for msg in work:
                if isinstance(msg, GenerateRequest) and msg.priority == 0 and not msg.prefill_only:
                    engine.interrupt_for(msg.tenant)
        return step.result()

    async def _start(self, req: GenerateRequest) -> None:
        assert self.engine is not None and self.tokenizer is not None
        received = time.time()
        if req.request_id in self._cancelled:
            await self.bus.publish(Finished(req.request_id, FinishStatus.CANCELLED))
            return
        try:
            prompt = full = prompt_ids(self.tokenizer, req)
            if req.prefill_only:
                await self._replace_preload(req)
                prompt = self._preload_prompt(prompt, req.tenant)
                if not prompt:  # nothing left to compute: every full block is cached already
                    self._forget_preload(req)
                    self._remember_prefix(req, full)
                    await self.bus.publish(Accepted(req.request_id, self.replica_id, 0))
                    await self.bus.publish(Finished(req.request_id, FinishStatus.STOP))
                    return
                params = SamplingParams(max_tokens=1)
            else:
                params = self._params(req, len(prompt))
            deadline = None if req.deadline is None else time.monotonic() + (req.deadline - time.time())
            self.engine.add_request(
                req.request_id,
                prompt,
                params,
                deadline=deadline,
                priority=req.priority,
                prefill_only=req.prefill_only,
                tenant=req.tenant,
            )
        except BlinkError as exc:
            await self.bus.publish(
                Finished(
                    req.request_id,
                    FinishStatus.ERROR,
                    error_code=exc.code,
                    error_message=exc.message,
                    error_param=exc.param,
                )
            )
            return
        traced = req.traceparent is not None and tracing.enabled()
        marks = {"received": received} if traced else None
        self._active[req.request_id] = _Active(req, TextOutput(self.tokenizer, req.sampling.stop), marks=marks)
        self._remember_prefix(req, full)
        if not await self.bus.publish(Accepted(req.request_id, self.replica_id, len(prompt))):
            await self._drop(req.request_id, FinishStatus.CANCELLED)

    async def _replace_preload(self, req: GenerateRequest) -> None:
        """One pre-load per session at a time: a newer one replaces the older (its finished blocks stay cached)."""
        if req.session_id is None:
            return
        previous = self._preloads.pop(req.session_id, None)
        if previous is not None and previous in self._active:
            assert self.engine is not None
            self.engine.abort(previous)
            self._active.pop(previous)
            await self.bus.publish(Finished(previous, FinishStatus.CANCELLED))
        self._preloads[req.session_id] = req.request_id

    def _preload_prompt(self, prompt: list[int], tenant: str | None) -> list[int]:
        """What a pre-load computes: at most --preload-max-tokens (its cap on speculative KV), and only whole
        blocks, since only whole blocks enter the prefix cache (a partial one would be recomputed at submit);
        empty if those blocks are all cached already (in `tenant`'s partition)."""
        assert self.engine is not None
        bs = self.engine.blocks.block_size
        limit = min(self.engine_config.preload_max_tokens, self.engine.max_model_len - 1, len(prompt))
        prompt = prompt[: limit // bs * bs]
        return prompt if self.engine.cached_tokens(prompt, tenant) < len(prompt) else []

    def _forget_preload(self, req: GenerateRequest) -> None:
        if req.session_id is not None and self._preloads.get(req.session_id) == req.request_id:
            del self._preloads[req.session_id]

    def _params(self, req: GenerateRequest, prompt_tokens: int) -> SamplingParams:
        assert self.engine is not None
        room = self.engine.max_model_len - prompt_tokens
        s = req.sampling
        if room <= 0 or (s.max_tokens is not None and s.max_tokens > room):
            asked = f" + {s.max_tokens} to generate" if s.max_tokens is not None else ""
            raise ContextLengthExceeded(
                f"this model's context is {self.engine.max_model_len} tokens; the request has "
                f"{prompt_tokens} prompt tokens{asked}",
                param="max_tokens" if room > 0 else "messages",
            )
        try:
            return SamplingParams(
                max_tokens=s.max_tokens or room,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=s.seed,
                ignore_eos=s.ignore_eos,
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def _emit(self, out: StepOutput) -> None:
        active = self._active.get(out.request_id)
        if active is None:  # warm-up or already dropped
            return
        if out.token_id is None:  # ended without a token: a pre-load is done, or the deadline passed
            del self._active[out.request_id]
            self._forget_preload(active.request)
            if out.finish_reason is FinishReason.PREFILLED:  # its blocks are in the prefix cache now
                finished = Finished(
                    out.request_id,
                    FinishStatus.STOP,
                    prompt_tokens=out.prompt_tokens,
                    cached_tokens=out.cached_tokens,
                    timings=self._timings(active, out),
                )
            else:
                finished = Finished(
                    out.request_id,
                    FinishStatus.ERROR,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    error_code="deadline_exceeded",
                    error_message="the request's deadline passed before it finished",
                )
            await self.bus.publish(finished)
            return
        if active.first_token is None:
            active.first_token = time.monotonic()
            if active.request.priority == 0:
                self.load.prefilled(out.prompt_tokens - out.cached_tokens, out.prefill_s)
            if active.marks is not None:
                active.marks.update(first_token=time.time(), queue_s=out.queue_s)
        text = active.output.push(out.token_id)
        if active.output.stopped and not out.finished:
            assert self.engine is not None
            self.engine.abort(out.request_id)
        done = out.finished or active.output.stopped
        if done:
            text += active.output.finish()
        if text and not await self._send_text(active, text, out.completion_tokens):
            await self._drop(out.request_id, FinishStatus.CANCELLED)
            return
        if active.marks is not None and text:
            active.marks.setdefault("first_sent", time.time())
        if done:
            if active.request.priority == 0:
                self.load.finished()
            ended = time.time()  # the Finished's time: the gateway's stream.end span starts here
            if active.marks is not None:
                self._trace(active, out, ended)
            status = FinishStatus.STOP if active.output.stopped else _FINISH_STATUS[out.finish_reason]  # type: ignore[index]
            del self._active[out.request_id]
            await self.bus.publish(
                Finished(
                    out.request_id,
                    status,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    cached_tokens=out.cached_tokens,
                    timings=self._timings(active, out),
                    created=ended,
                )
            )

    @staticmethod
    def _trace(active: _Active, out: StepOutput, ended: float) -> None:
        """This replica's spans of a finished request (telemetry/tracing.py: they tile its time here). Decode ends
        at `ended`, the time its Finished carries, so a last step that adds no text (a stop token) is decode's."""
        m, req = active.marks, active.request
        assert m is not None and "first_token" in m
        scheduled = m["received"] + m["queue_s"]
        first_sent = m.get("first_sent", m["first_token"])
        spans: list[tuple[str, float, float, dict[str, Any]]] = [
            ("replica.queue", m["received"], scheduled, {"blink.replica.waiting_s": m["queue_s"]}),
            (
                "engine.prefill",
                scheduled,
                m["first_token"],
                {
                    "gen_ai.usage.input_tokens": out.prompt_tokens,
                    "blink.cached_tokens": out.cached_tokens,
                    "blink.computed_tokens": out.prompt_tokens - out.cached_tokens,
                },
            ),
            ("first_token", m["first_token"], first_sent, {}),
            (
                "engine.decode",
                first_sent,
                ended,
                {
                    "gen_ai.usage.output_tokens": out.completion_tokens,
                    "blink.speculative.proposed": out.spec_proposed,
                    "blink.speculative.accepted": out.spec_accepted,
                },
            ),
        ]
        if req.submitted is not None:
            spans.insert(0, ("bus.publish", req.submitted, m["received"], {}))
        tracing.replica_spans(req.traceparent, spans)

    async def _send_text(self, active: _Active, text: str, completion_tokens: int) -> bool:
        event = TokenEvent(active.request.request_id, active.events, text, completion_tokens)
        active.events += 1
        return await self.bus.publish(event)

    @staticmethod
    def _timings(active: _Active, out: StepOutput) -> dict[str, Any]:
        decode_s = time.monotonic() - active.first_token if active.first_token else 0.0
        return {
            "queue_ms": round(out.queue_s * 1000, 3),
            "prefill_ms": round(out.prefill_s * 1000, 3),
            "decode_ms": round(decode_s * 1000, 3),
            "speculative": {"proposed": out.spec_proposed, "accepted": out.spec_accepted},
        }

    async def _cancel(self, request_id: str) -> None:
        if request_id in self._active:
            await self._drop(request_id, FinishStatus.CANCELLED)
            return
        self._cancelled[request_id] = None  # it may still be on its way to us
        while len(self._cancelled) > _REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)

    async def _drop(self, request_id: str, status: FinishStatus, *, error: str | None = None) -> None:
        """End a request early: free its sequence at once, then tell the gateway."""
        assert self.engine is not None
        prompt_tokens, completion_tokens = self.engine.num_tokens(request_id)
        self.engine.abort(request_id)
        active = self._active.pop(request_id, None)
        if active is not None:
            self._forget_preload(active.request)
        await self.bus.publish(
            Finished(
                request_id,
                status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                error_code="engine_failure" if error else None,
                error_message=error,
            )
        )
