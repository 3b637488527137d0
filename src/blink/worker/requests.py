"""The requests a replica runs, from the bus message to the last event: start one (its prompt, its sampling, one
pre-load per session), turn the engine's outputs into TokenEvents and a Finished, cancel or drop one, and hand
them back when the replica stops. The engine and the tokenizer are loaded before this exists.

The replica never waits on a client: a slow or vanished consumer makes `publish` return False and the request
is dropped.

Pre-decodes (predecode.py) are held here until a request adopts one. An adopted request keeps the pre-decode's
engine sequence, so `active` is keyed by engine request id and `_adopted` maps the live request's id to it. An
adoption may be made while a step runs (`start_in_step`: the replica takes it off the bus then, to send the held
tokens at once): the engine calls it needs wait in `pending` until the step ends (`run_pending`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from blink.bus.base import Bus
from blink.bus.messages import Accepted, Finished, FinishStatus, GenerateRequest, TokenEvent
from blink.config import EngineConfig
from blink.engine.errors import ContextTooLong
from blink.engine.sequence import FinishReason, SamplingParams, StepOutput
from blink.errors import BlinkError, ContextLengthExceeded, InvalidRequest
from blink.telemetry import tracing
from blink.worker.finish import Active, timings, trace
from blink.worker.load import LoadEstimator
from blink.worker.loading import Serving
from blink.worker.output import TextOutput
from blink.worker.predecode import Held, Predecodes, adoptable
from blink.worker.prompt import prompt_ids
from blink.worker.status import Prefixes

log = logging.getLogger("blink.worker")

REMEMBERED_CANCELS = 10_000
HELD_HEAD_START_S = 0.002  # after an adoption sends its held tokens, before the engine steps on (see _adopt)
_FINISH_STATUS = {FinishReason.STOP: FinishStatus.STOP, FinishReason.LENGTH: FinishStatus.LENGTH}


class Requests:
    def __init__(
        self, bus: Bus, serving: Serving, config: EngineConfig, replica_id: str, load: LoadEstimator, prefixes: Prefixes
    ) -> None:
        self.bus, self.engine, self.tokenizer = bus, serving.engine, serving.tokenizer
        self.config, self.replica_id, self.load, self.prefixes = config, replica_id, load, prefixes
        self.active: dict[str, Active] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._preloads: dict[str, str] = {}  # session id -> its pre-load's request id, while it runs
        self.predecodes = Predecodes()
        self._adopted: dict[str, str] = {}  # a live request's id -> the pre-decode's (its engine request id)
        self.pending: list[Callable[[], object]] = []  # engine calls held until the step in flight ends
        self._in_step = False

    def run_pending(self) -> None:
        """Between steps: the engine calls adoptions made during the last step left for now."""
        pending, self.pending = self.pending, []
        for call in pending:
            call()

    def _engine_call(self, call: Callable[[], object]) -> None:
        if self._in_step:
            self.pending.append(call)
        else:
            call()

    async def start_in_step(self, req: GenerateRequest) -> bool:
        """While a step runs: start `req` if it adopts a pre-decode that needs no engine step to send its tokens
        (parked, now reserved for it, or ended) and is its question; False (nothing done): start it after the
        step."""
        held = self.predecodes.held.get(req.adopt) if req.adopt else None
        if held is None or req.request_id in self._cancelled:
            return False
        try:
            prompt = prompt_ids(self.tokenizer, req)
        except BlinkError:
            return False
        if not adoptable(held, req, prompt) or not (held.ended or self.engine.reserve(held.request.request_id)):
            return False
        self._in_step = True
        try:
            return await self._adopt(req, prompt, time.time())
        finally:
            self._in_step = False

    async def start(self, req: GenerateRequest) -> None:
        received = time.time()
        if req.request_id in self._cancelled:
            await self.bus.publish(Finished(req.request_id, FinishStatus.CANCELLED))
            return
        await self._start(req, received)

    async def _start(self, req: GenerateRequest, received: float) -> None:
        for stale in self.predecodes.stale():
            self.predecodes.forget(stale)
        try:
            prompt = full = prompt_ids(self.tokenizer, req)
            if req.adopt is not None and await self._adopt(req, prompt, received):
                return
            if req.predecode:
                await self._replace_predecode(req, prompt)
            if req.prefill_only:
                await self._replace_preload(req)
                prompt = self._preload_prompt(prompt, req.tenant, capped=req.priority > 0)
                if not prompt:  # nothing left to compute: every full block is cached already
                    self._forget_preload(req)
                    self.prefixes.remember(req, full, self.engine.blocks.block_size)
                    cached = self.engine.cached_tokens(full, req.tenant)
                    await self.bus.publish(Accepted(req.request_id, self.replica_id, len(full)))
                    await self.bus.publish(
                        Finished(req.request_id, FinishStatus.STOP, prompt_tokens=len(full), cached_tokens=cached)
                    )
                    return
            self._add(req, prompt)
        except BlinkError as exc:
            self.predecodes.forget(req.request_id)
            error = Finished(
                req.request_id,
                FinishStatus.ERROR,
                error_code=exc.code,
                error_message=exc.message,
                error_param=exc.param,
            )
            await self.bus.publish(error)
            return
        marks = {"received": received} if req.traceparent is not None and tracing.enabled() else None
        active = Active(req, TextOutput(self.tokenizer, req.sampling.stop), marks=marks, prompt_tokens=len(full))
        self.active[req.request_id] = active
        self.prefixes.remember(req, full, self.engine.blocks.block_size)
        if req.predecode:  # its Finished comes when it has its tokens
            return
        if not await self.bus.publish(Accepted(req.request_id, self.replica_id, len(prompt))):
            await self.drop(req.request_id, FinishStatus.CANCELLED)

    async def _adopt(self, req: GenerateRequest, prompt: list[int], received: float) -> bool:
        """Go on from the pre-decode `req.adopt` names if it is `req`'s question (predecode.py): its held tokens
        are sent now. False (the pre-decode, if any, abandoned): `req` runs as usual."""
        assert req.adopt is not None
        held = self.predecodes.held.get(req.adopt)
        if held is None or not adoptable(held, req, prompt):
            await self._abandon(req.adopt)
            return False
        engine_id = held.request.request_id
        deadline = None if req.deadline is None else time.monotonic() + (req.deadline - time.time())
        self.predecodes.forget(engine_id)
        self.active.pop(engine_id, None)
        if not held.announced:  # adopted before it had its tokens: its own request ends here
            await self.bus.publish(Finished(engine_id, FinishStatus.STOP, completion_tokens=held.tokens))
        self._adopted[req.request_id] = engine_id
        marks = {"received": received} if req.traceparent is not None and tracing.enabled() else None
        active = Active(req, TextOutput(self.tokenizer, req.sampling.stop), marks=marks, predecoded=held.tokens)
        active.first_token = time.monotonic()  # the first token is sent now: no prefill to learn from
        if marks is not None:
            marks.update(first_token=time.time(), queue_s=0.0)
        self.active[engine_id] = active
        if not held.ended:
            self._engine_call(lambda: self._engine_adopt(engine_id, req, deadline))
        self.prefixes.remember(req, prompt, self.engine.blocks.block_size)
        if not await self.bus.publish(Accepted(req.request_id, self.replica_id, len(prompt))):
            await self.drop(req.request_id, FinishStatus.CANCELLED)
            return True
        for out in held.outputs:
            if engine_id not in self.active:
                break  # it ended (a stop string, a finish within the held tokens, or the client went away)
            await self.emit(out)
        if not held.ended and not self._in_step:
            # a head start for the held tokens before the step this adoption starts: in one process the gateway
            # forwards them on this loop, which that step (every core) would keep waiting for a time slice (2-9 ms
            # measured). A step already running (start_in_step) gains nothing from waiting
            await asyncio.sleep(HELD_HEAD_START_S)
        return True

    def _engine_adopt(self, engine_id: str, req: GenerateRequest, deadline: float | None) -> None:
        """The engine side of an adoption: the sequence runs on as `req` (or, if the request ended meanwhile,
        is freed)."""
        active = self.active.get(engine_id)
        if active is None or active.request is not req:
            self.engine.abort(engine_id)
        elif not self.engine.adopt(engine_id, max_tokens=req.sampling.max_tokens, deadline=deadline):
            raise RuntimeError(f"pre-decode {engine_id} could not be adopted")  # reserved: cannot happen

    async def _replace_predecode(self, req: GenerateRequest, prompt: list[int]) -> None:
        """One pre-decode per session: a newer one abandons the older."""
        previous = self.predecodes.add(req, prompt)
        if previous is not None:
            await self._abandon(previous)

    async def _abandon(self, request_id: str) -> None:
        """Free a pre-decode nobody will adopt (its Finished, if not sent yet, says cancelled)."""
        held = self.predecodes.forget(request_id)
        if held is None:
            return
        if request_id in self.active:
            self._engine_call(lambda: self.engine.abort(request_id))
            del self.active[request_id]
        if not held.announced:
            await self.bus.publish(Finished(request_id, FinishStatus.CANCELLED, completion_tokens=held.tokens))

    def _add(self, req: GenerateRequest, prompt: list[int]) -> None:
        """Queue the request in the engine; what the engine refuses becomes the API's error."""
        s = req.sampling
        try:
            if req.prefill_only:
                params = SamplingParams(max_tokens=1)
            else:
                params = SamplingParams(
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    seed=s.seed,
                    ignore_eos=s.ignore_eos,
                )
            deadline = None if req.deadline is None else time.monotonic() + (req.deadline - time.time())
            self.engine.add_request(
                req.request_id,
                prompt,
                params,
                deadline=deadline,
                priority=req.priority,
                prefill_only=req.prefill_only,
                park_after=req.predecode,
                tenant=req.tenant,
                prediction=self.tokenizer.encode(req.prediction, bos=False) if req.prediction else None,
            )
        except ContextTooLong as exc:
            raise ContextLengthExceeded(str(exc), param=exc.param) from None
        except ValueError as exc:  # RequestRejected (a ValueError), or SamplingParams' own checks
            raise InvalidRequest(str(exc), param=getattr(exc, "param", None)) from None

    async def _replace_preload(self, req: GenerateRequest) -> None:
        """One pre-load per session at a time: a newer one replaces the older (its finished blocks stay cached)."""
        if req.session_id is None:
            return
        previous = self._preloads.pop(req.session_id, None)
        if previous is not None and previous in self.active:
            self.engine.abort(previous)
            self.active.pop(previous)
            await self.bus.publish(Finished(previous, FinishStatus.CANCELLED))
        self._preloads[req.session_id] = req.request_id

    def _preload_prompt(self, prompt: list[int], tenant: str | None, *, capped: bool) -> list[int]:
        """What a prefill-only request computes: only whole blocks, since only whole blocks enter the prefix cache
        (a partial one would be recomputed at submit), and for a pre-load (`capped`) at most --preload-max-tokens
        (its cap on speculative KV); empty if those blocks are all cached already (in `tenant`'s partition)."""
        bs = self.engine.blocks.block_size
        cap = self.config.preload_max_tokens if capped else len(prompt)
        limit = min(cap, self.engine.max_model_len - 1, len(prompt))
        prompt = prompt[: limit // bs * bs]
        return prompt if self.engine.cached_tokens(prompt, tenant) < len(prompt) else []

    def _forget_preload(self, req: GenerateRequest) -> None:
        if req.session_id is not None and self._preloads.get(req.session_id) == req.request_id:
            del self._preloads[req.session_id]

    # outputs ------------------------------------------------------------------------------------------
    async def emit(self, out: StepOutput) -> None:
        active = self.active.get(out.request_id)
        if active is None:  # warm-up or already dropped
            return
        held = self.predecodes.held.get(out.request_id)
        if held is not None:
            await self._hold(held, out)
            return
        if out.token_id is None:  # ended without a token: a pre-load is done, or the deadline passed
            await self._end_without_token(active, out)
            return
        if active.first_token is None:
            active.first_token = time.monotonic()
            if active.request.priority == 0:
                self.load.prefilled(out.prompt_tokens - out.cached_tokens, out.prefill_s)
            if active.marks is not None:
                active.marks.update(first_token=time.time(), queue_s=out.queue_s)
        text = active.output.push(out.token_id)
        if active.output.stopped and not out.finished:
            self._engine_call(lambda: self.engine.abort(out.request_id))
        done = out.finished or active.output.stopped
        if done:
            text += active.output.finish()
        if text:
            event = TokenEvent(active.request.request_id, active.events, text, out.completion_tokens)
            active.events += 1
            if not await self.bus.publish(event):
                await self.drop(active.request.request_id, FinishStatus.CANCELLED)
                return
            if active.marks is not None:
                active.marks.setdefault("first_sent", time.time())
        if done:
            await self._finish(active, out)

    async def _hold(self, held: Held, out: StepOutput) -> None:
        """An output of a pre-decode: held for its adopter; the gateway hears once it has its tokens."""
        if out.token_id is None:  # its deadline passed, or evicted for blocks
            self.predecodes.forget(out.request_id)
            self.active.pop(out.request_id, None)
            if not held.announced:
                await self.bus.publish(Finished(out.request_id, FinishStatus.CANCELLED, completion_tokens=held.tokens))
            return
        held.outputs.append(out)
        held.ended = held.ended or out.finished
        if held.announced or not held.ready():
            return
        held.announced = True
        finished = Finished(
            out.request_id,
            FinishStatus.STOP,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=held.tokens,
            cached_tokens=out.cached_tokens,
            timings={"prefill_ms": round(out.prefill_s * 1000, 3), "predecoded_tokens": held.tokens},
        )
        await self.bus.publish(finished)

    async def _finish(self, active: Active, out: StepOutput) -> None:
        if active.request.priority == 0:
            self.load.finished()
        ended = time.time()  # the Finished's time: the gateway's stream.end span starts here
        if active.marks is not None:
            trace(active, out, ended)
        status = FinishStatus.STOP if active.output.stopped else _FINISH_STATUS[out.finish_reason]  # type: ignore[index]
        del self.active[out.request_id]
        self._adopted.pop(active.request.request_id, None)
        extra = {"predecoded_tokens": active.predecoded} if active.predecoded else {}
        finished = Finished(
            active.request.request_id,
            status,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            prediction_accepted=out.prediction_accepted,
            prediction_rejected=out.prediction_rejected,
            timings={**timings(active, out), **extra},
            created=ended,
        )
        await self.bus.publish(finished)

    async def _end_without_token(self, active: Active, out: StepOutput) -> None:
        del self.active[out.request_id]
        self._adopted.pop(active.request.request_id, None)
        self._forget_preload(active.request)
        if out.finish_reason is FinishReason.PREFILLED:  # its blocks are in the prefix cache now
            finished = Finished(
                out.request_id,
                FinishStatus.STOP,
                prompt_tokens=active.prompt_tokens or out.prompt_tokens,  # the whole prompt, not its whole blocks
                cached_tokens=out.cached_tokens,
                timings=timings(active, out),
            )
        else:
            finished = Finished(
                active.request.request_id,
                FinishStatus.ERROR,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                error_code="deadline_exceeded",
                error_message="the request's deadline passed before it finished",
            )
        await self.bus.publish(finished)

    # ending early -------------------------------------------------------------------------------------
    async def cancel(self, request_id: str) -> None:
        if request_id in self.predecodes.held:
            await self._abandon(request_id)
            return
        if self._adopted.get(request_id, request_id) in self.active:
            await self.drop(request_id, FinishStatus.CANCELLED)
            return
        self._cancelled[request_id] = None  # it may still be on its way to us
        while len(self._cancelled) > REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)

    async def drop(self, request_id: str, status: FinishStatus, *, error: str | None = None) -> None:
        """End a request early (`request_id`: its own, or its engine sequence's): free its sequence at once, then
        tell the gateway."""
        engine_id = self._adopted.pop(request_id, request_id)
        if (held := self.predecodes.forget(engine_id)) is not None and held.announced:
            self._engine_call(lambda: self.engine.abort(engine_id))
            self.active.pop(engine_id, None)
            return  # a pre-decode the gateway has finished with: nothing to tell
        prompt_tokens, completion_tokens = self.engine.num_tokens(engine_id)
        self._engine_call(lambda: self.engine.abort(engine_id))
        active = self.active.pop(engine_id, None)
        if active is not None:
            self._forget_preload(active.request)
            request_id = active.request.request_id
            self._adopted.pop(request_id, None)
        finished = Finished(
            request_id,
            status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            error_code="engine_failure" if error else None,
            error_message=error,
        )
        await self.bus.publish(finished)

    async def drop_all(self, status: FinishStatus, *, error: str | None = None) -> None:
        for request_id in list(self.active):
            await self.drop(request_id, status, error=error)

    async def hand_back(self) -> int:
        """Forget the requests in flight without a word to their clients (the bus re-delivers them to another
        replica, which continues them); pre-loads, background work not worth a restart elsewhere, end cancelled."""
        handed = 0
        for request_id, active in list(self.active.items()):
            if active.request.prefill_only or active.request.predecode:
                await self.drop(request_id, FinishStatus.CANCELLED)
            else:
                self.engine.abort(request_id)
                del self.active[request_id]
                self._adopted.pop(active.request.request_id, None)
                handed += 1
        return handed
