"""int8 weights (weight-only and w8a8): close to fp32, and a token's result never depends on the rest of its batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import loader, quant
from blink.models.quant import Int8Linear, Int8WeightOnly


@pytest.mark.parametrize("kind", [Int8Linear, Int8WeightOnly])
def test_int8_linear_is_close_to_fp32_and_batch_invariant(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    q = kind(linear)
    x = torch.randn(9, 64)
    with torch.inference_mode():
        full, ref = q(x), linear(x)
        assert full.dtype == torch.float32
        assert (full - ref).abs().max() < 0.03 * ref.abs().max()
        for i in range(len(x)):  # alone, or in a batch with other rows: bit for bit the same
            assert torch.equal(q(x[i : i + 1]), full[i : i + 1])
        assert torch.equal(q(x[2:5]), full[2:5])


def test_smoothing_tames_an_outlier_channel() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(32, 64)
    x[:, 5] *= 60  # one channel far larger than the rest, as in real activations
    with torch.inference_mode():
        ref = linear(x)
        plain = (Int8Linear(linear)(x) - ref).abs().mean()
        smoothed = (Int8Linear(linear, x.abs().amax(0))(x) - ref).abs().mean()
    assert smoothed < 0.5 * plain


@pytest.mark.parametrize(("fmt", "kind"), [("int8", Int8WeightOnly), ("w8a8", Int8Linear)])
def test_convert_replaces_every_linear_and_rejects_unknown_formats(fmt: str, kind: type[nn.Module]) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)))
    quant.convert(model, fmt)  # type: ignore[arg-type]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, kind) for m in model.modules()) == 2
    with pytest.raises(ValueError, match="unknown weight format"):
        quant.convert(model, "int3")


@pytest.fixture(scope="module")
def w8a8_model(model_dir):  # type: ignore[no-untyped-def]
    model, tok = loader.load(model_dir)
    return quant.convert(model, "w8a8", tok.encode(quant.CALIBRATION_TEXT)), tok


def test_a_w8a8_prefix_hit_gives_the_same_greedy_tokens_as_a_cold_start(w8a8_model) -> None:  # type: ignore[no-untyped-def]
    model, tok = w8a8_model
    system = {"role": "system", "content": "You answer in one short sentence about animals. " * 4}
    first = tok.encode_chat([system, {"role": "user", "content": "What do owls eat?"}])
    second = tok.encode_chat([system, {"role": "user", "content": "Where do whales live?"}])
    params = SamplingParams(max_tokens=24, temperature=0)
    config = EngineConfig(max_num_seqs=4, max_model_len=256)
    cold = LLMEngine(model, tok.stop_token_ids, EngineConfig(max_num_seqs=4, max_model_len=256, prefix_caching=False))
    expected = cold.generate(second, params)
    warm = LLMEngine(model, tok.stop_token_ids, config)
    warm.generate(first, params, request_id="first")
    warm.add_request("other", first, params)  # decoding alongside, so the hit runs inside a mixed batch
    warm.step()
    warm.add_request("second", second, params)
    got = []
    while warm.has_work():
        got += [o.token_id for o in warm.step() if o.request_id == "second"]
    assert got == expected
    assert warm.blocks.num_cached_blocks > 0


@pytest.mark.parametrize(
    "question",
    ["What is the capital of France?", "What does a compiler do?"],
)
def test_a_streams_greedy_tokens_do_not_depend_on_what_shares_its_steps(w8a8_model, question: str) -> None:  # type: ignore[no-untyped-def]
    model, tok = w8a8_model
    prompt = tok.encode_chat([{"role": "user", "content": question}])
    other = tok.encode("Tell me a story about a dragon and a knight who became friends. " * 20)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    def run(company: bool) -> list[int]:
        config = EngineConfig(max_num_seqs=4, max_model_len=1024, background_step_tokens=32, background_period=1)
        engine = LLMEngine(model, tok.stop_token_ids, config)
        engine.add_request("live", prompt, params)
        out: list[int] = []
        for step in range(200):
            if company and step in (0, 3, 10):  # pre-loads: prompt chunks of 1-4 tokens beside the live decode
                pre = SamplingParams(max_tokens=1)
                engine.add_request(f"pre{step}", other[: 100 + step], pre, priority=1, prefill_only=True)
            if company and step == 5:  # and another live stream, at another length
                engine.add_request("other", other[:30], params)
            out += [o.token_id for o in engine.step() if o.request_id == "live" and o.token_id is not None]
            if not engine.has_work():
                break
        return out

    assert run(company=True) == run(company=False)


def test_a_context_shorter_than_the_calibration_text_still_quantises(model_dir) -> None:  # type: ignore[no-untyped-def]
    """--max-model-len 96 sizes the rotary tables to 96 positions; the calibration text is longer (the server of
    the fuzz test never became ready when calibration indexed past them)."""
    model, tok = loader.load(model_dir, context=96)
    calibration = tok.encode(quant.CALIBRATION_TEXT)
    assert len(calibration) > model.positions == 96
    quant.convert(model, "w8a8", calibration)
    engine = LLMEngine(model, tok.stop_token_ids, EngineConfig(max_model_len=96))
    engine.add_request("a", tok.encode_chat([{"role": "user", "content": "Hi!"}]), SamplingParams(max_tokens=4))
    while engine.has_work():
        engine.step()
