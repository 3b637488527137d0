"""Rotary embedding frequencies, with the context-extension schemes checkpoints declare.

    inverse_frequencies(head_dim, rope) -> (inv_freq [head_dim / 2], attention_factor)

`rope` is the model's rope parameters as Hugging Face writes them (`rope_parameters`, or the older `rope_theta` +
`rope_scaling`, normalised by `families.py`): {"rope_type": "default" | "linear" | "llama3" | "yarn" | "longrope",
"rope_theta": ..., and the type's own keys}. The formulas are those of the papers and of `transformers`'
modeling_rope_utils.py (the reference the tests compare against); `attention_factor` multiplies cos and sin.
A GGUF carries Llama 3's scaling as per-frequency divisors (`rope_freqs.weight`), given here as `freq_factors`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def inverse_frequencies(
    head_dim: int, rope: dict[str, Any], *, context: int = 0, freq_factors: list[float] | None = None
) -> tuple[torch.Tensor, float]:
    """`context`: the longest position the engine will use (longrope picks its short or long factors by it)."""
    kind = rope.get("rope_type", "default")
    base = float(rope["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, rope)
    if kind == "longrope":
        return _longrope(head_dim, base, rope, context)
    raise ValueError(f"rope scaling {kind!r} is not supported ({', '.join(ROPE_TYPES)})")


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    # low frequencies divided by `factor`, high ones kept, the band between interpolated smoothly
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, rope: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = float(rope["factor"]), float(rope["original_max_position_embeddings"])
    attention = rope.get("attention_factor")
    if attention is None:
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = _mscale(factor, mscale) / _mscale(factor, all_dim) if mscale and all_dim else _mscale(factor)
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolate) + (1.0 / freqs) * extrapolate
    return inv_freq, float(attention)


def _longrope(dim: int, base: float, rope: dict[str, Any], context: int) -> tuple[torch.Tensor, float]:
    original = int(rope["original_max_position_embeddings"])
    factor = float(rope.get("factor") or 1.0)
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(rope["long_factor"] if context > original else rope["short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, float(attention)
