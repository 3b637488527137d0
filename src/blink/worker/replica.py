"""A replica: load → warm up → READY, then the engine loop.

    LOADING ──▶ WARMING ──▶ READY ──▶ DRAINING ──▶ STOPPED     (any state ──▶ STOPPED on failure)

The loop alternates between taking work from the bus (requests, cancels) and one `engine.step()` on the
replica's own engine thread, so a cancel that arrives during a step frees its sequence before the next one.
While a step runs the loop keeps taking work off the bus (every `bus.step_poll_s`), held until the step ends; a
live request that fairness.py's rule 3 will give a step of its own calls the running step off
(`engine.interrupt_for`), so one tenant's long flood steps don't hold another tenant's first token back.
Every torch call (load, warm-up, steps) runs on that one thread: torch's OpenMP pool belongs to the thread that
uses it, and hopping between executor threads measured ~45% slower decode steps on 2 cores. The engine thread and
the event loop share the GIL: a step's Python parts (scheduling, building its tensors) hold it, and with Python's
default 5 ms switch interval the loop waited up to that long to send a token it already had (measured: a
pre-decoded first token took 5.3 ms median from response.create to the first delta on an idle server, 1.7 ms with
SWITCH_INTERVAL_S), so a replica's process switches every 0.5 ms.
The parts: loading.py (load and warm up: a `Serving`, engine and tokenizer), requests.py (each request from the
bus message to its Finished), status.py (heartbeats), finish.py (timings, trace spans); prompts are built by
prompt.py with the model's chat template (models/tokenizer.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from blink.bus.base import Bus
from blink.bus.messages import Cancel, Finished, FinishStatus, GenerateRequest, ReplicaState, WorkMessage
from blink.config import EngineConfig, ModelConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import StepOutput
from blink.models.tokenizer import Tokenizer
from blink.worker import loading
from blink.worker.load import LoadEstimator
from blink.worker.requests import Requests
from blink.worker.status import Prefixes, replica_status

log = logging.getLogger("blink.worker")
T = TypeVar("T")
SWITCH_INTERVAL_S = 0.0005  # the GIL's, while a replica runs (see the module docstring)

_TRANSITIONS = {
    ReplicaState.LOADING: {ReplicaState.WARMING, ReplicaState.STOPPED},
    ReplicaState.WARMING: {ReplicaState.READY, ReplicaState.STOPPED},
    ReplicaState.READY: {ReplicaState.DRAINING, ReplicaState.STOPPED},
    ReplicaState.DRAINING: {ReplicaState.STOPPED},
    ReplicaState.STOPPED: set(),
}


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
        self.model_name = model.served_name()  # its pool on the bus, the name clients use
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self.heartbeat_s = heartbeat_s
        self.progress = progress
        self.state = ReplicaState.LOADING
        self.serving: loading.Serving | None = None  # once loaded
        self.requests: Requests | None = None  # once loaded
        self.prefixes = Prefixes()
        self.load = LoadEstimator()  # prefill and finish rates of live requests: the queue wait heartbeats carry
        self._stopping = asyncio.Event()
        self._inbox: list[WorkMessage] = []  # taken off the bus while a step ran: started after it
        self._drain_until = 0.0  # monotonic time a stopping replica stops finishing its requests
        self.ready = asyncio.Event()  # set once the model is loaded and warmed
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blink-engine")

    @property
    def engine(self) -> LLMEngine | None:
        return self.serving.engine if self.serving else None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.serving.tokenizer if self.serving else None

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
        status = replica_status(
            self.replica_id,
            self.model_name,
            self.state,
            self.engine_config.speculative,
            self.engine,
            self.load,
            self.prefixes,
        )
        await self.bus.heartbeat(status)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat()

    def _load(self) -> None:
        config = self.engine_config
        serving = loading.load(self.model_config, config, replica_id=self.replica_id, progress=self.progress)
        self.serving = serving
        self.requests = Requests(self.bus, serving, config, self.replica_id, self.load, self.prefixes)

    async def run(self) -> None:
        """Load, warm up, serve until `stop()`. Returns when stopped; raises if loading fails."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        await self._heartbeat()
        # heartbeats from the start: a gateway whose response lost its replica waits for one that is still
        # loading or warming (a replacement) only while it hears from it
        beat = asyncio.create_task(self._beat())
        try:
            await self._on_engine_thread(self._load)
            await self._set_state(ReplicaState.WARMING)
            assert self.serving is not None and self.requests is not None
            serving, requests = self.serving, self.requests
            await self._on_engine_thread(
                lambda: loading.warm_up(serving, self.engine_config, replica_id=self.replica_id)
            )
            await self._set_state(ReplicaState.READY)
            self.ready.set()
            await self._loop(serving.engine, requests)
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
        hand_back = self.bus.reclaims and self._stopping.is_set()
        if not hand_back:
            for req in held:
                await self.bus.publish(Finished(req.request_id, FinishStatus.CANCELLED))
        if self.requests is None or not self.requests.active:
            return
        if hand_back:
            handed = await self.requests.hand_back()
            log.info("replica %s: handed back %d request(s) to the pool", self.replica_id, handed)
        else:
            await self.requests.drop_all(FinishStatus.CANCELLED)

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking work (DRAINING) and finish the requests in flight for up to `drain_s` seconds. What is left
        then is handed back when the bus re-delivers a stopped replica's requests (Redis: another replica claims
        and restarts them, and the gateway continues each client's text where it was); otherwise it ends as
        cancelled. Returns at once; `run()` returns when the replica has stopped."""
        self._drain_until = time.monotonic() + drain_s
        if self.state is ReplicaState.READY:
            await self._set_state(ReplicaState.DRAINING)
        self._stopping.set()

    # the loop ------------------------------------------------------------------------------------------
    async def _loop(self, engine: LLMEngine, requests: Requests) -> None:
        while not self._stopping.is_set() or (requests.active and time.monotonic() < self._drain_until):
            work, self._inbox = self._inbox, []
            work += await self.bus.receive(
                self.model_name,
                self.replica_id,
                wait=0 if engine.has_work() or work else 0.2,
                max_requests=self._room(engine, work),
            )
            for msg in work:
                if isinstance(msg, Cancel):
                    await requests.cancel(msg.request_id)
                else:
                    await requests.start(msg)
            requests.run_pending()
            if not engine.has_work():
                continue
            try:
                outputs = await self._step(engine, requests)
            except Exception as exc:  # a bug or resource failure in one step must not kill the replica
                log.exception("engine step failed")
                await requests.drop_all(FinishStatus.ERROR, error=f"engine step failed: {exc}")
                continue
            for out in outputs:
                await requests.emit(out)

    def _room(self, engine: LLMEngine, held: list[WorkMessage]) -> int:
        """New requests to take off the bus: only what the engine can start soon (the rest stays on the bus,
        where the gateway's --max-pending-requests bound applies and another replica may take it); none while
        draining (cancels still reach it)."""
        if self._stopping.is_set():
            return 0
        waiting = engine.num_waiting + sum(1 for m in held if isinstance(m, GenerateRequest))
        return max(0, self.engine_config.max_num_seqs - waiting)

    async def _step(self, engine: LLMEngine, requests: Requests) -> list[StepOutput]:
        """One engine step, taking work off the bus meanwhile (held in the inbox until it ends, except a request
        that adopts a parked pre-decode: its tokens are sent at once, the engine's part waits for the step's end)."""
        step = asyncio.ensure_future(self._on_engine_thread(engine.step))
        poll = self.bus.step_poll_s
        while not (await asyncio.wait({step}, timeout=poll))[0]:
            work = await self.bus.receive(
                self.model_name, self.replica_id, wait=0, max_requests=self._room(engine, self._inbox)
            )
            for msg in work:
                if isinstance(msg, GenerateRequest) and msg.adopt and await requests.start_in_step(msg):
                    continue  # it adopted a parked pre-decode: its tokens went out now
                self._inbox.append(msg)
                if isinstance(msg, GenerateRequest) and msg.priority == 0 and not msg.prefill_only:
                    engine.interrupt_for(msg.tenant)
        return step.result()
