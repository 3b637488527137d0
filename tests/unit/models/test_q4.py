"""The 4-bit format (q4): its quantization is llama.cpp's Q4_1 (a Q4_1 GGUF's weights come back as the same
blocks), its kernel computes what the formula says, bit for bit at every instruction level, and a row's result
does not depend on the batch it is in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.models import native, q4, quant
from blink.models.llama import CausalAttention, LlamaConfig, LlamaModel
from tests.tiny_models import greedy_alone_then_batched

LEVELS = list(range(native.q4_best_level() + 1))  # empty without the kernel: then the tests fail, as they should


def reference(x: torch.Tensor, layer: q4.Q4Linear, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's formula in torch ops, in the kernel's order of float operations (one op per rounding)."""
    rows, k = x.shape
    groups = k // 32
    blocks = x.reshape(rows, groups, 32)
    amax = blocks.abs().amax(dim=-1)  # [M, G]
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inverse.unsqueeze(-1)).clamp(-127, 127)  # half to even, as nearbyintf
    dx = amax / 127.0
    sx = dx * xq.sum(dim=-1)
    qg = q.reshape(q.shape[0], groups, 32).to(torch.int64)
    acc = torch.zeros(rows, q.shape[0])
    for g in range(groups):
        isum = (xq[:, g].to(torch.int64) @ qg[:, g].T).float()  # exact: |sum| < 2^24
        acc = acc + isum * (dx[:, g : g + 1] * d[:, g].float())
        acc = acc + m[:, g].float() * sx[:, g : g + 1]
    return acc if layer.bias is None else acc + layer.bias


@pytest.mark.parametrize("shape", [(64, 64), (40, 96), (100, 576)])  # a channel count that is not a multiple of 16
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_the_formula_bit_for_bit_at_every_level(shape: tuple[int, int], bias: bool) -> None:
    torch.manual_seed(0)
    n, k = shape
    linear = nn.Linear(k, n, bias=bias)
    x = torch.randn(7, k) * torch.linspace(0.1, 4, k)  # columns of different ranges, some outliers
    x[2, 5] = 0.0
    x[3] = 0.0  # an all-zero row: scale 0, no division by it
    q, d, m = native.q4_quantize(linear.weight.detach())
    assert LEVELS, "the C extension blink.models._native did not build: run `make install`"
    for level in LEVELS:
        layer = q4.Q4Linear(linear, level=level)
        assert torch.equal(layer(x), reference(x, layer, q, d, m)), native.Q4_LEVELS[level]


def test_a_rows_result_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(1)
    layer = q4.Q4Linear(nn.Linear(128, 48))
    x = torch.randn(37, 128)
    whole = layer(x)
    for rows in (1, 2, 3, 5, 16):
        assert torch.equal(torch.cat([layer(part) for part in x.split(rows)]), whole)


def test_q4_1_blocks_round_trip_exactly() -> None:
    """Weights dequantized from Q4_1 blocks (what `prepare` writes for a Q4_1 GGUF) quantize to the same blocks."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    original = rng.standard_normal((32, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(original, gguf.GGMLQuantizationType.Q4_1)
    weights = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).copy())
    q, d, m = native.q4_quantize(weights)
    again = (q.float().reshape(32, 8, 32) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(32, 256)
    assert torch.equal(again, weights)


def test_quantization_error_is_what_4_bits_give() -> None:
    torch.manual_seed(2)
    weight = torch.randn(64, 256)
    q, d, m = native.q4_quantize(weight)
    back = (q.float().reshape(64, 8, 32) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(64, 256)
    step = d.float().repeat_interleave(32, dim=1)
    assert ((back - weight).abs() <= step * 0.5 + 1e-2).all()  # within half a step (and fp16's rounding of d, m)


def test_without_the_kernel_q4_is_refused_with_a_reason() -> None:
    model = nn.Module()
    with pytest.raises(ValueError, match="C kernel"):
        quant.convert(model, "q4", native_kernels=False)  # type: ignore[arg-type]


def test_auto_takes_q4_for_a_model_in_its_blocks_and_w8a8_for_the_rest() -> None:
    assert quant.choose("auto", {"Q4_1": 150, "F32": 61, "Q8_0": 1}) == "q4"
    assert quant.choose("auto", {"Q4_0": 150, "F32": 61}) == "q4"
    assert quant.choose("auto", {"Q4_K": 120, "Q6_K": 30, "F32": 50}) == "q4"  # a Q4_K_M file: its own blocks
    assert quant.choose("auto", {"Q6_K": 120, "F32": 50}) == "w8a8"
    assert quant.choose("auto", {"Q8_0": 150, "F32": 61}) == "w8a8"
    assert quant.choose("auto", {"F16": 150, "F32": 61}) == "w8a8"
    assert quant.choose("auto", {}) == "w8a8"  # safetensors
    assert quant.choose("auto", {"Q4_1": 150}, native_kernels=False) == "w8a8"
    assert quant.choose("int8", {"Q4_1": 150}) == "int8"  # asked for: kept


def tiny_llama(seed: int) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    model = LlamaModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_fused_layers_compute_what_the_unfused_ones_do() -> None:
    """The norms, SwiGLU and residual adds inside the kernel calls: the same model, to float rounding."""
    fused, plain = tiny_llama(3), tiny_llama(3)
    quant.convert(fused, "q4")
    original = quant.fuse_layers
    try:
        quant.fuse_layers = lambda model: 0  # type: ignore[assignment]
        quant.convert(plain, "q4")
    finally:
        quant.fuse_layers = original
    assert all(layer.fused for layer in fused.layers) and not any(layer.fused for layer in plain.layers)
    ids = list(range(5, 45))
    n = len(ids)
    with torch.no_grad():
        got = fused(torch.tensor(ids), torch.arange(n), CausalAttention(fused.config), torch.arange(n))
        want = plain(torch.tensor(ids), torch.arange(n), CausalAttention(plain.config), torch.arange(n))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_a_fused_q4_engine_gives_each_prompt_the_same_tokens_alone_and_batched() -> None:
    model = quant.convert(tiny_llama(4), "q4")
    prompts = [[1 + (i * j) % 90 for j in range(8 + 5 * i)] for i in range(6)]
    config = EngineConfig(max_model_len=128, kv_cache_mb=4, block_size=4)
    batched = greedy_alone_then_batched(LLMEngine(model, frozenset(), config), prompts, 12)
    alone = [greedy_alone_then_batched(LLMEngine(model, frozenset(), config), [p], 12)[0] for p in prompts]
    assert batched == alone
