"""The native decode step (engine/fused_decode.py): a fused q4 model's decode-only steps run every layer in one C
call, and their logits are bit for bit the module path's, for plain decode rows, several sequences at once and
verification rows; other models and other steps keep the modules; an interrupt set from another thread calls
the step off as the module path's does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from blink.config import EngineConfig
from blink.engine.attention import StepInterrupted
from blink.engine.fused_decode import FusedDecoder
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import quant
from blink.models.llama import LlamaModel
from blink.models.qwen3 import Qwen3Model
from tests.tiny_models import random_llama


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as served: the kernels split their work between threads
    yield
    torch.set_num_threads(before)


def tiny(seed: int, *, bias: bool = False, family: type[LlamaModel] = LlamaModel, **changes: object) -> LlamaModel:
    return random_llama(seed, family, attention_bias=bias, **changes)  # type: ignore[no-any-return]


def engine(model: LlamaModel, *, fused: bool, kv: str = "auto") -> LLMEngine:
    config = EngineConfig(
        max_model_len=128,
        kv_cache_mb=4,
        block_size=4,
        prediction_tokens=6,
        speculative_policy="always",
        kv_cache_dtype=kv,
    )
    e = LLMEngine(model, frozenset(), config)
    if not fused:
        e.runner.fused = None
    return e


def run(e: LLMEngine, prompts: list[list[int]], predictions: list[list[int] | None]) -> tuple[list, list]:
    """Every step's logits and each request's tokens, all requests added at once (several decode rows a step)."""
    logits: list[torch.Tensor] = []
    forward = e.runner.forward

    def recording(*args: object, **kwargs: object) -> tuple[torch.Tensor, list]:
        out = forward(*args, **kwargs)  # type: ignore[arg-type]
        logits.append(out[0].clone())
        return out

    e.runner.forward = recording  # type: ignore[method-assign]
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, (prompt, prediction) in enumerate(zip(prompts, predictions, strict=True)):
        e.add_request(str(i), prompt, SamplingParams(max_tokens=14, temperature=0), prediction=prediction)
    while e.has_work():
        for out in e.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    return logits, [tokens[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2-biases"])
@pytest.mark.parametrize("kv", ["auto", "fp32"], ids=["fp16-cache", "fp32-cache"])
def test_native_steps_give_the_module_paths_logits_bit_for_bit(bias: bool, kv: str) -> None:
    """Logits, tokens and the K/V each path wrote (rounded to fp16 in C by the native step, by torch in the
    module path) are the same bits."""
    model = quant.convert(tiny(5, bias=bias), "q4")
    fused, modules = engine(model, fused=True, kv=kv), engine(model, fused=False, kv=kv)
    assert fused.runner.fused is not None
    assert fused.runner.kv.k[0].dtype == (torch.float16 if kv == "auto" else torch.float32)
    prompts = [[1 + (i * j) % 90 for j in range(6 + 7 * i)] for i in range(4)]
    _, plain = run(engine(model, fused=False, kv=kv), prompts, [None] * 4)
    # predictions: the plain answer with one token changed (verification rows that are partly right), and none
    predictions = [[*plain[0][:5], (plain[0][5] + 1) % 96, *plain[0][6:]], None, plain[2], None]
    got, got_tokens = run(fused, prompts, predictions)
    want, want_tokens = run(modules, prompts, predictions)
    assert got_tokens == want_tokens == plain
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    for mine, theirs in zip(
        fused.runner.kv.k + fused.runner.kv.v, modules.runner.kv.k + modules.runner.kv.v, strict=True
    ):
        assert torch.equal(mine, theirs)
    assert fused.speculator.policy.accepted > 0  # verification rows did run


def test_decode_steps_skip_the_modules_and_prefill_steps_use_them() -> None:
    model = quant.convert(tiny(6), "q4")
    calls = []
    model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    e = engine(model, fused=True)
    e.add_request("a", list(range(1, 20)), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    e.step()  # the prompt: through the modules
    assert calls == [1]
    while e.has_work():
        e.step()
    assert calls == [1]  # nine decode steps, none through the modules


@pytest.mark.parametrize(
    "make",
    [
        lambda: quant.convert(tiny(1), "w8a8"),  # not q4
        lambda: tiny(1),  # fp32
        lambda: quant.convert(tiny(1, family=Qwen3Model), "q4"),  # q/k norms: the modules'
        lambda: quant.convert(tiny(1, sliding_window=8), "q4"),  # a sliding window
    ],
    ids=["w8a8", "fp32", "qwen3", "sliding-window"],
)
def test_other_models_keep_the_modules(make: object) -> None:
    model = make()  # type: ignore[operator]
    e = LLMEngine(model, frozenset(), EngineConfig(max_model_len=128, kv_cache_mb=4, block_size=4))
    assert e.runner.fused is None
    assert FusedDecoder.for_model(model, e.runner.kv) is None


def test_an_interrupt_calls_the_native_step_off_and_a_rerun_gives_the_same_tokens() -> None:
    model = quant.convert(tiny(7), "q4")
    e = engine(model, fused=True)
    e.add_request("a", list(range(1, 30)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    e.step()
    e.runner.interrupt.set()
    assert e.runner.interrupt.byte.value == 1
    forward = e.runner.forward
    with pytest.raises(StepInterrupted):  # the next step is a decode step: the native one, called off
        forward(*_decode_step(e), interruptible=True)
    e.runner.interrupt.clear()
    assert e.runner.interrupt.byte.value == 0
    tokens = []
    while e.has_work():
        tokens += [o.token_id for o in e.step() if o.token_id is not None]
    alone = engine(model, fused=False)
    alone.add_request("a", list(range(1, 30)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    want = []
    while alone.has_work():
        want += [o.token_id for o in alone.step() if o.token_id is not None]
    assert tokens == want[1:]


def _decode_step(e: LLMEngine) -> tuple[object, list[list[int]]]:
    from blink.engine.scheduler import ScheduledBatch

    seq = next(iter(e._seqs.values()))
    batch = ScheduledBatch(sequences=[seq], chunks=[1])
    return batch, [e.blocks.table(seq.request_id)]
