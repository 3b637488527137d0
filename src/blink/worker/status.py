"""What a replica's heartbeats say (ReplicaStatus): its state, its engine's load, the queue wait a new request
would see, and which conversations' prefixes its prefix cache still holds (the gateway routes by them)."""

from __future__ import annotations

from collections import OrderedDict

from blink.bus.messages import GenerateRequest, ReplicaState, ReplicaStatus
from blink.engine.llm_engine import LLMEngine
from blink.worker.load import LoadEstimator, Queue

REMEMBERED_PREFIXES = 1024  # affinity keys of recent requests, checked against the prefix cache at each heartbeat
HEARTBEAT_PREFIXES = 128  # the most a heartbeat reports


class Prefixes:
    """The affinity keys of recent requests, each with its tenant and its prompt's first block (+1 token)."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, tuple[str | None, list[int]]] = OrderedDict()

    def remember(self, req: GenerateRequest, prompt: list[int], block_size: int) -> None:
        if req.affinity is None or len(prompt) <= block_size:
            return
        self._keys[req.affinity] = (req.tenant, prompt[: block_size + 1])
        self._keys.move_to_end(req.affinity)
        while len(self._keys) > REMEMBERED_PREFIXES:
            self._keys.popitem(last=False)

    def held(self, engine: LLMEngine) -> tuple[str, ...]:
        """The keys (newest first, at most HEARTBEAT_PREFIXES) whose prompt's first block is still in the prefix
        cache: a request with that key (of the same tenant) would find it there. Each is looked up in its own
        tenant's partition, so another tenant's blocks never make a key look held."""
        held = []
        for key, (tenant, tokens) in reversed(self._keys.items()):
            if engine.cached_tokens(tokens, tenant):
                held.append(key)
                if len(held) == HEARTBEAT_PREFIXES:
                    break
        return tuple(held)


def replica_status(
    replica_id: str,
    model: str,
    state: ReplicaState,
    speculative: str,
    engine: LLMEngine | None = None,
    load: LoadEstimator | None = None,
    prefixes: Prefixes | None = None,
) -> ReplicaStatus:
    """The heartbeat of a replica; without an engine (still loading), its state alone."""
    if engine is None:
        return ReplicaStatus(replica_id=replica_id, model=model, state=state, speculative=speculative)
    pending, waiting, free = engine.live_backlog()
    return ReplicaStatus(
        replica_id=replica_id,
        model=model,
        state=state,
        running=engine.num_running,
        waiting=engine.num_waiting,
        max_model_len=engine.max_model_len,
        kv_blocks_in_use=engine.blocks.num_blocks - engine.blocks.num_free_blocks,
        kv_blocks_total=engine.blocks.num_blocks,
        background_prefill_tokens=engine.background_prefill_tokens,
        interrupted_steps=engine.interrupted_steps,
        background_tokens_used=engine.scheduler.background_tokens_used,
        parked=len(engine.scheduler.parked),
        speculative=speculative,
        spec_proposed=engine.speculation.proposed,
        spec_accepted=engine.speculation.accepted,
        queue_wait_s=round(load.wait_s(Queue(pending, waiting, free)), 3) if load else 0.0,
        prefixes=prefixes.held(engine) if prefixes else (),
        architecture=engine.architecture,
        weights_mib=round(engine.weights_bytes / 2**20, 1),
        kv_cache_mib=round(engine.kv_cache_bytes / 2**20, 1),
    )
