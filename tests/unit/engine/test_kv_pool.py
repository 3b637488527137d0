"""The KV pool takes memory as its blocks are written, not all of it at start (attention.zero_pages): an
unwritten page reads as zero and costs nothing; a written one is the process's like any other."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from blink.engine.attention import zero_pages

MIB = 1 << 20


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def test_a_pool_is_resident_only_where_it_was_written() -> None:
    before = resident_mib()
    pool = zero_pages((256 * MIB // 4 // 64, 64), torch.float32)  # 256 MiB
    assert float(pool.max()) == 0.0 and float(pool.min()) == 0.0  # read whole: zeros, and still not resident
    assert resident_mib() - before < 64
    pool[: 128 * MIB // 4 // 64] = 1.0  # half of it written
    assert resident_mib() - before > 100
    assert float(pool.sum()) == 128 * MIB // 4
    del pool


def test_quantized_weights_get_an_fp16_cache_by_default_holding_twice_the_tokens() -> None:
    """--kv-cache-dtype auto: fp16 for quantized weights (as llama.cpp's default cache), the model's own dtype for
    fp32 and bf16 weights; the same --kv-cache-mb then holds twice the tokens in fp16. The CLI's check before the
    model loads (config.kv_cache_bytes) follows the same rule."""
    from blink.config import EngineConfig, kv_cache_bytes
    from blink.engine.llm_engine import LLMEngine
    from blink.engine.runner import kv_cache_dtype
    from blink.models import quant
    from tests.tiny_models import random_llama as tiny_llama

    for weights, dtype in (("q4", torch.float16), ("w8a8", torch.float16), ("int8", torch.float16)):
        model = quant.convert(tiny_llama(1), weights)
        assert kv_cache_dtype(model) == dtype and kv_cache_bytes(weights, "auto") == 2
        assert kv_cache_dtype(model, "fp32") == torch.float32 and kv_cache_bytes(weights, "fp32") == 4
    fp32 = tiny_llama(1)
    assert kv_cache_dtype(fp32) == torch.float32 and kv_cache_bytes("fp32", "auto") == 4
    assert kv_cache_dtype(fp32, "fp16") == torch.float16 and kv_cache_bytes("fp32", "fp16") == 2
    assert kv_cache_dtype(fp32.to(torch.bfloat16)) == torch.bfloat16 and kv_cache_bytes("bf16", "auto") == 2
    model = quant.convert(tiny_llama(1), "w8a8")
    half = LLMEngine(model, frozenset(), EngineConfig(max_model_len=64, kv_cache_mb=2, block_size=4))
    config = EngineConfig(max_model_len=64, kv_cache_mb=2, block_size=4, kv_cache_dtype="fp32")
    full = LLMEngine(model, frozenset(), config)
    assert half.runner.kv.k[0].dtype == torch.float16 and full.runner.kv.k[0].dtype == torch.float32
    assert half.blocks.num_blocks == 2 * full.blocks.num_blocks
