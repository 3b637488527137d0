"""blink's C kernels (`_native.c`, `_attention.c`; built by `pip install`, optional): the w8a8 linear layer and
decode attention, one call each.

Why: at batch 1 a decode step of the 135M model spent more time in torch's int8 matrix kernels and in the ~10
small torch ops around each of its 211 linear layers (quantize the activations, multiply the scales) than its
weight bytes need: `_int_mm` and `_weight_int8pack_mm` read int8 weights at 15-35 GB/s here, the kernel at
50-140 GB/s (AVX-512 VNNI where the CPU has it, else AVX2). Decode attention gathered every sequence's keys,
padded to 512, for SDPA; the kernel reads them in place. benchmarks/results/engine.md has the step times.

Contracts: `linear` computes exactly what `quant.Int8Linear`'s torch ops compute (tested bit for bit at every
level): the products are summed as exact integers, and every float operation is the same one in the same order
(compiled without FMA contraction), so the weights' numbers are the same with or without the kernel.
`attend_decode` computes each (row, head) alone in a fixed order: a row's result never depends on the other rows
(tested), which speculative decoding's identity with plain decoding rests on; it differs from SDPA's in the last
bits (an engine uses one or the other throughout).

Without the extension (no C compiler at install, a CPU other than x86-64 with no build), or with
`--no-native-kernels`, the engine runs on the torch ops.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Protocol

import torch  # first: the kernel's OpenMP then binds to the libgomp torch loaded (one thread pool, not two)

try:
    from blink.models import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None  # type: ignore[assignment]

BLOCK = 16  # output channels per packed weight block (the C kernel's CH)
LEVELS = ("portable", "avx2", "avx512-vnni")
AVX2_MAX_ROWS = 4  # see fast_for


def available() -> bool:
    return _native is not None


def best_level() -> int:
    """The fastest instruction level this CPU runs (an index into LEVELS); -1 without the extension."""
    return -1 if _native is None else int(_native.best_level())


def describe() -> str:
    level = best_level()
    return "not built (torch ops)" if level < 0 else f"blink C kernel ({LEVELS[level]})"


def fast_for(rows: int, level: int) -> bool:
    """Whether the kernel beats torch's `_int_mm` for `rows` activation rows. With AVX-512 VNNI it does at every
    size measured (1-500 rows). AVX2 has no int8 multiply-add that cannot saturate, and how it compares with
    torch depends on the CPU: on one it measured 2x slower than `_int_mm` from a few rows up, on another (an AMD
    EPYC with AVX2 only) 38x faster at 100 rows, where `_int_mm` fell back to a slow path (a 100-token prefill of
    the 135M model took 6 s). So with AVX2 `serves_every_size` measures it once per process."""
    return serves_every_size(level) or rows <= AVX2_MAX_ROWS


def serves_every_size(level: int) -> bool:
    """Whether `fast_for` is true at every number of rows (else torch's ops need the weights' own layout too)."""
    return level >= 2 or (level == 1 and _avx2_beats_torch())


# torch's `_int_mm` must beat the AVX2 kernel by this factor to take prefill from it: a wrong choice for torch
# costs far more (40x on a CPU where `_int_mm` runs its slow path) than one for the kernel, and a process timing
# the two while another process loads a model beside it sees noise of that order
TORCH_MARGIN = 2.0


@functools.cache
def _avx2_beats_torch() -> bool:
    """Whether the AVX2 kernel stays at prefill sizes on this CPU: the best of 5 interleaved timings of each at 16
    and 128 rows of a 576 -> 1536 layer (the default model's MLP; ~0.1 s once, at the first model's load). The
    two compute the same numbers (tested), so the choice changes only the speed."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=gen)
    packed, wsum = pack(weight)
    weight_t, scale = weight.t(), torch.ones(1536)
    for rows in (16, 128):
        x = torch.randn(rows, 576, generator=gen)
        xq = torch.randint(-127, 128, (rows, 576), dtype=torch.int8, generator=gen)
        ours, theirs = _best_of(
            5,
            lambda: linear(x, packed, wsum, scale, None, None, 1536, 1),  # noqa: B023
            lambda: torch._int_mm(xq, weight_t) * scale,  # noqa: B023
        )
        if not keeps_avx2(ours, theirs):
            return False
    return True


def keeps_avx2(ours: float, theirs: float) -> bool:
    """The decision on one size's timings (seconds): the AVX2 kernel keeps it unless torch is TORCH_MARGIN faster."""
    return theirs * TORCH_MARGIN >= ours


def _best_of(n: int, *fns: Callable[[], object]) -> list[float]:
    """Each function's best time of `n`, the functions taking turns (so a burst of load hits them alike)."""
    for fn in fns:
        fn()  # warm: first-call allocations and thread start-up
    best = [float("inf")] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights [N, K] -> (packed [N/16, K/4, 16, 4], N and K padded with zeros; 128 * row sums [N padded])."""
    n, k = weight.shape
    np_, kp = -(-n // BLOCK) * BLOCK, -(-k // 4) * 4
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = weight
    packed = padded.view(np_ // BLOCK, BLOCK, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    wsum = torch.empty(np_, dtype=torch.int32)
    for i in range(0, np_, 4096):  # in chunks: a 49k-row lm_head's int32 copy would be 113 MB at once
        wsum[i : i + 4096] = padded[i : i + 4096].to(torch.int32).sum(dim=1, dtype=torch.int32) * 128
    return packed, wsum


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    wsum: torch.Tensor,
    weight_scale: torch.Tensor,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    level: int,
) -> torch.Tensor:
    """x fp32 [M, K] -> [M, out_features] fp32, as `Int8Linear` computes it; `level` at most `best_level()`.
    The scales, smoothing factors and bias are fp32 and contiguous."""
    assert _native is not None
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    _native.linear(
        x.data_ptr(),
        m,
        k,
        0 if smooth is None else smooth.data_ptr(),
        packed.data_ptr(),
        wsum.data_ptr(),
        weight_scale.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        y.data_ptr(),
        out_features,
        packed.shape[1] * 4,
        torch.get_num_threads(),
        level,
    )
    return y


# the KV cache dtypes the decode attention kernel reads
KV_DTYPES = (torch.float32, torch.float16)


def attend_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Decode attention in place: for each i, step row `rows[i]` of q [N, H, D] attends to `lengths[i]` keys
    and values of the cache [slots, KVH, D] at slots[offsets[i]:], and its output goes to the same row of out
    [N, H, D]. Each (row, head) is computed alone and in a fixed order (see _attention.c): bit for bit the same
    whatever the other rows are. q and out fp32, the cache fp32 or fp16 (widened as it is read) and contiguous;
    q and out may be strided views (last dim dense); the index tensors int64 and contiguous."""
    assert _native is not None
    heads, dim = q.shape[1], q.shape[2]
    assert q.stride(2) == out.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype == out.dtype == torch.float32 and k_cache.dtype == v_cache.dtype in KV_DTYPES
    _native.attend_decode(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        rows.data_ptr(),
        lengths.data_ptr(),
        offsets.data_ptr(),
        slots.data_ptr(),
        len(rows),
        heads,
        k_cache.shape[1],
        dim,
        dim**-0.5,
        torch.get_num_threads(),
        k_cache.dtype == torch.float16,
    )


class DecodeIndex(Protocol):
    """Where each decode row's keys are (engine/attention.py's NativeDecodeRows): int64, contiguous."""

    rows: torch.Tensor  # [R] each row's index in the step
    lengths: torch.Tensor  # [R] its number of keys
    offsets: torch.Tensor  # [R] where its slots start in `slots`
    slots: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# q4: 4-bit weights in blocks of 32 inputs (llama.cpp's Q4_1), activations int8 per 32 (its Q8_1); see _q4.c

Q4_GROUP = 32
Q4_LEVELS = ("portable", "avx2", "avx512-vnni")


def q4_best_level() -> int:
    """The fastest level of the q4 kernel on this CPU (an index into Q4_LEVELS); -1 without the extension."""
    return -1 if _native is None else int(_native.q4_best_level())


def q4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [N, K] (K a multiple of 32) -> (q uint8 [N, K] in 0..15, d fp16 [N, K/32], m fp16 [N, K/32]) with
    w ~ d * q + m, as llama.cpp quantizes Q4_1 (min and max of each block of 32; q = trunc((w - min) / d + 0.5)):
    the weights of a Q4_1 GGUF come back as the same blocks."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // Q4_GROUP, Q4_GROUP)
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    d = (high - low) / 15.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = ((blocks - low.unsqueeze(-1)) * inverse.unsqueeze(-1) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), d.half(), low.half()


def q4_pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(q [N, K], d and m [N, K/32]) -> the kernel's layout, uint8 [N/16 (padded), K/32, 320]: per group, 8 steps
    of 4 inputs x 16 channels as nibbles (channel c in the low nibble of byte c * 4 + i, channel c + 8 in its high
    one), then the 16 channels' d and m as fp16. Padding channels are zero."""
    n, k = q.shape
    groups, np_ = k // Q4_GROUP, -(-n // BLOCK) * BLOCK
    qp = torch.zeros(np_, k, dtype=torch.uint8)
    qp[:n] = q
    dp, mp = torch.zeros(np_, groups, dtype=torch.float16), torch.zeros(np_, groups, dtype=torch.float16)
    dp[:n], mp[:n] = d, m
    # [blocks, 16, groups, 8 steps, 4] -> [blocks, groups, steps, 16 channels, 4 inputs]
    steps = qp.view(np_ // BLOCK, BLOCK, groups, 8, 4).permute(0, 2, 3, 1, 4)
    nibbles = steps[:, :, :, :8] | (steps[:, :, :, 8:] << 4)  # [blocks, groups, steps, 8, 4]
    nibbles = nibbles.reshape(np_ // BLOCK, groups, 256)
    scales = torch.stack([dp.view(np_ // BLOCK, BLOCK, groups), mp.view(np_ // BLOCK, BLOCK, groups)], dim=1)
    scales = scales.permute(0, 3, 1, 2).contiguous().view(torch.uint8).reshape(np_ // BLOCK, groups, 64)
    return torch.cat([nibbles, scales], dim=-1).contiguous()


def q4_unpack(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `q4_pack`: (q uint8 [n, K], d and m fp16 [n, K/32]) of a packed weight with n channels."""
    blocks, groups = packed.shape[0], packed.shape[1]
    nibbles = packed[..., :256].reshape(blocks, groups, 8, 8, 4)
    steps = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=3)  # [blocks, groups, steps, 16 channels, 4 inputs]
    q = steps.permute(0, 3, 1, 2, 4).reshape(blocks * BLOCK, groups * Q4_GROUP)
    scales = packed[..., 256:].contiguous().view(torch.float16).view(blocks, groups, 2, BLOCK)
    d, m = (scales[:, :, i].permute(0, 2, 1).reshape(blocks * BLOCK, groups) for i in (0, 1))
    return q[:n], d[:n], m[:n]


Q4_PLAIN, Q4_RMSNORM, Q4_SWIGLU = 0, 1, 2  # the kernel's prologues (see _q4.c)


def q4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    level: int,
    *,
    prologue: int = Q4_PLAIN,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x fp32 [M, K] ([M, 2K] for Q4_SWIGLU) -> [M, out_features] fp32 through the q4 kernel, `level` at most
    `q4_best_level()`: with Q4_RMSNORM x is first normalised (`norm` [K] fp32, `eps`), with Q4_SWIGLU it is
    silu(x[:, :K]) * x[:, K:]; `residual` [M, out_features] is added to the result."""
    assert _native is not None
    x = x.contiguous()
    m = x.shape[0]
    k = x.shape[1] // 2 if prologue == Q4_SWIGLU else x.shape[1]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if residual is not None:
        assert residual.shape == y.shape and residual.dtype == torch.float32
        residual = residual.contiguous()
    _native.q4_linear(
        x.data_ptr(),
        m,
        k,
        packed.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        y.data_ptr(),
        out_features,
        torch.get_num_threads(),
        level,
        prologue,
        0 if norm is None else norm.data_ptr(),
        eps,
        0 if residual is None else residual.data_ptr(),
    )
    return y


def decode_layers(
    x: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
    inter: int,
    table: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    decode: DecodeIndex,
    level: int,
    interrupt: int,
    cut: int,
    half: bool = False,
) -> int:
    """Every layer of a fused q4 model over the step's decode rows x [M, hidden] fp32, in place (see _decode.c):
    `table` [layers, 12] int64 holds each layer's pointers (engine/fused_decode.py's FIELDS), cos/sin the rotary
    tables [positions, dim], `decode` each row's keys (NativeDecodeRows). `interrupt`: the address of a byte set
    from another thread to stop before a layer below `cut` (0: none); `half`: the cache tensors in `table` are
    fp16 (each K/V row rounded to nearest even as it is written, as torch's .to(torch.float16)). Returns the layers
    run."""
    assert _native is not None
    assert x.is_contiguous() and x.dtype == torch.float32 and table.is_contiguous()
    for index in (positions, slot_mapping, decode.rows, decode.lengths, decode.offsets, decode.slots):
        assert index.dtype == torch.int64 and index.is_contiguous()
    return int(
        _native.decode_layers(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            heads,
            kv_heads,
            dim,
            inter,
            table.shape[0],
            table.data_ptr(),
            eps,
            cos.data_ptr(),
            sin.data_ptr(),
            positions.data_ptr(),
            slot_mapping.data_ptr(),
            decode.rows.data_ptr(),
            decode.lengths.data_ptr(),
            decode.offsets.data_ptr(),
            decode.slots.data_ptr(),
            dim**-0.5,
            torch.get_num_threads(),
            level,
            interrupt,
            cut,
            half,
        )
    )
