"""Pre-decode in the engine: a background sequence decodes its first tokens, parks, and a live request adopts it
(llm_engine.py, scheduler.py), on the real default model."""

from __future__ import annotations

import pytest

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import FinishReason, SamplingParams, SeqStatus

GREEDY = SamplingParams(max_tokens=24, temperature=0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7)


def new_engine(model_and_tokenizer, **kwargs) -> LLMEngine:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    return LLMEngine(model, tok.stop_token_ids, EngineConfig(**{"max_num_seqs": 4, "max_model_len": 256, **kwargs}))


def prompt(model_and_tokenizer, text: str = "Why is the sky blue? Answer in two sentences.") -> list[int]:  # type: ignore[no-untyped-def]
    return list(model_and_tokenizer[1].encode_chat([{"role": "user", "content": text}]))


def tokens_of(engine: LLMEngine, request_id: str) -> tuple[list[int], FinishReason | None]:
    out: list[int] = []
    reason = None
    while engine.has_work():
        for o in engine.step():
            if o.request_id == request_id:
                if o.token_id is not None:
                    out.append(o.token_id)
                if o.finished:
                    reason = o.finish_reason
    return out, reason


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_an_adopted_pre_decode_gives_the_tokens_of_a_cold_run(model_and_tokenizer, params: SamplingParams) -> None:  # type: ignore[no-untyped-def]
    ids = prompt(model_and_tokenizer)
    cold = new_engine(model_and_tokenizer).generate(ids, params)
    engine = new_engine(model_and_tokenizer)
    engine.add_request("pre", ids, params, priority=2, park_after=4)
    early, reason = tokens_of(engine, "pre")
    assert len(early) == 4 and reason is None  # parked, not finished
    assert not engine.has_work()  # a parked sequence runs no steps
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks  # and keeps its KV
    assert engine.reserve("pre")
    assert engine.adopt("pre", max_tokens=params.max_tokens, deadline=None)
    rest, reason = tokens_of(engine, "pre")
    assert early + rest == cold
    assert reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_pre_decode_adopted_mid_way_goes_on_as_a_live_request(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = prompt(model_and_tokenizer)
    cold = new_engine(model_and_tokenizer).generate(ids, GREEDY)
    engine = new_engine(model_and_tokenizer)
    engine.add_request("pre", ids, GREEDY, priority=2, park_after=8)
    got: list[int] = []
    while len(got) < 2:
        got += [o.token_id for o in engine.step() if o.token_id is not None]
    assert engine.adopt("pre", max_tokens=GREEDY.max_tokens, deadline=None)
    rest, _ = tokens_of(engine, "pre")
    assert got + rest == cold  # it did not park at 8: it is live now


def test_an_abandoned_parked_pre_decode_frees_its_blocks(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = new_engine(model_and_tokenizer)
    engine.add_request("pre", prompt(model_and_tokenizer), GREEDY, priority=2, park_after=3)
    tokens_of(engine, "pre")
    assert engine.abort("pre")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.adopt("pre", max_tokens=10, deadline=None)


def test_a_parked_pre_decode_expires_at_its_deadline_unless_reserved(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import time

    engine = new_engine(model_and_tokenizer)
    ids = prompt(model_and_tokenizer)
    engine.add_request("a", ids, GREEDY, priority=2, park_after=2, deadline=time.monotonic() + 60)
    engine.add_request("b", ids, GREEDY, priority=2, park_after=2, deadline=time.monotonic() + 60)
    while engine.has_work():
        engine.step()
    assert engine.reserve("b")
    for name in ("a", "b"):
        engine._seqs[name].deadline = time.monotonic() - 1  # both deadlines pass
    engine.add_request("live", ids, SamplingParams(max_tokens=1, temperature=0))
    ended = {o.request_id: o.finish_reason for o in engine.step() if o.finished}
    assert ended.get("a") is FinishReason.EXPIRED
    assert "b" not in ended and engine._seqs["b"].status is SeqStatus.PARKED


def test_live_work_short_of_blocks_evicts_parked_pre_decodes_first(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from blink.engine.attention import PagedKVCache
    from blink.engine.runner import kv_cache_dtype

    model, tok = model_and_tokenizer
    per_block = PagedKVCache.bytes_per_block(model, 16, kv_cache_dtype(model))
    blocks = 4 * 2**20 // per_block  # in a 4 MiB cache; the context is made as long as they hold
    assert blocks >= 3
    engine = new_engine(model_and_tokenizer, kv_cache_mb=4, max_model_len=blocks * 16, block_size=16)
    short = list(tok.encode_chat([{"role": "user", "content": "Hi"}]))
    engine.add_request("pre", short, SamplingParams(max_tokens=8, temperature=0), priority=2, park_after=2)
    tokens_of(engine, "pre")
    assert engine.blocks.num_free_blocks < blocks
    # a live prompt that needs every block: only the parked pre-decode's can make room
    live = (short * blocks)[: blocks * 16 - 2]
    engine.add_request("live", live, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    ended = {}
    while engine.has_work():
        ended |= {o.request_id: o.finish_reason for o in engine.step() if o.finished}
    assert ended == {"pre": FinishReason.EXPIRED, "live": FinishReason.LENGTH}


def test_a_pre_decode_takes_only_the_background_place_while_live_streams_decode(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = new_engine(model_and_tokenizer)
    ids = prompt(model_and_tokenizer)
    batches = []
    schedule = engine.scheduler.schedule

    def recorded(now: float):  # type: ignore[no-untyped-def]
        batch = schedule(now)
        batches.append([(s.request_id, s.priority, n) for s, n in zip(batch.sequences, batch.chunks, strict=True)])
        return batch

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    engine.add_request("live", ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.add_request("p1", ids, GREEDY, priority=2, park_after=6)
    engine.add_request("p2", ids, GREEDY, priority=2, park_after=6)
    done = set()
    while "live" not in done:
        done |= {o.request_id for o in engine.step() if o.finished}
    while_live = [b for b in batches if any(r == "live" for r, _, _ in b)][2:]  # after its prompt
    assert while_live and all(sum(1 for _, prio, _ in b if prio > 0) <= 1 for b in while_live)
    assert any(sum(1 for _, prio, _ in b if prio > 0) == 1 for b in while_live)  # but it does use that place
