"""The C kernel computes exactly what Int8Linear's torch ops compute, at every instruction level this CPU has."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from blink.models import native
from blink.models.quant import Int8Linear

LEVELS = range(native.best_level() + 1)  # empty without the extension: then there is nothing to compare


def test_the_kernel_is_built_on_x86_64() -> None:
    # the build is optional (a machine without a C compiler still installs); on the machines blink targets it
    # must not fail silently, or the engine quietly falls back to 2-3x slower torch ops
    if platform.machine() in ("x86_64", "AMD64"):
        assert native.available(), "the C extension blink.models._native did not build: run `make install`"
        assert native.best_level() >= 1, "an x86-64 CPU without AVX2?"


@pytest.mark.parametrize(
    ("n", "k", "bias", "smooth"),
    [(96, 64, True, True), (48, 1536, False, True), (37, 70, True, False), (16, 4, False, False)],
)
@pytest.mark.parametrize("level", LEVELS)
def test_kernel_matches_the_torch_ops_bit_for_bit(n: int, k: int, bias: bool, smooth: bool, level: int) -> None:
    torch.manual_seed(n + k)
    linear = nn.Linear(k, n, bias=bias)
    absmax = torch.rand(k) * 8 if smooth else None
    kernel = Int8Linear(linear, absmax, level=level)
    reference = Int8Linear(linear, absmax, level=-1)  # torch._int_mm and friends
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 8, 13, 64):
            x = torch.randn(rows, k) * torch.rand(k) * 4
            x[0, k // 2] = 50.0  # an outlier channel: the row's scale comes from it
            got, want = kernel(x), reference(x)
            assert got.shape == want.shape == (rows, n)
            assert torch.equal(got, want), f"{rows} rows: max difference {(got - want).abs().max()}"


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_rows_do_not_depend_on_their_company(level: int) -> None:
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(128, 80), torch.rand(128), level=level)
    x = torch.randn(11, 128)
    with torch.inference_mode():
        full = q(x)
        for i in range(len(x)):
            assert torch.equal(q(x[i : i + 1]), full[i : i + 1])
        assert torch.equal(q(x[3:9]), full[3:9])


def test_pack_lays_out_blocks_of_16_channels_by_4_inputs() -> None:
    w = torch.randint(-127, 128, (37, 70), dtype=torch.int8)
    packed, wsum = native.pack(w)
    assert packed.shape == (3, 18, 16, 4)  # 37 channels -> 3 blocks of 16, 70 -> 72 inputs
    assert packed[2, 5, 3, 1] == w[2 * 16 + 3, 5 * 4 + 1]  # block, k-step, channel, input
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(48, 72)[:37, :70], w)
    assert torch.equal(wsum[:37], w.to(torch.int32).sum(1) * 128) and not wsum[37:].any()


def test_a_level_this_cpu_lacks_is_refused_and_no_kernel_means_torch_ops() -> None:
    q = Int8Linear(nn.Linear(8, 16))
    if not native.available():
        assert q.level == -1 and q(torch.randn(1, 8)).shape == (1, 16)
        return
    assert q.level == native.best_level()
    with pytest.raises(ValueError, match="not available on this CPU"):
        Int8Linear(nn.Linear(8, 16), level=native.best_level() + 1)(torch.randn(1, 8))


def test_torch_takes_prefill_from_the_avx2_kernel_only_when_clearly_faster() -> None:
    """The timings decide with a margin: noise from another process loading beside this one must not hand prefill
    to a `_int_mm` that is as slow as the kernel, or 40x slower."""
    assert native.keeps_avx2(ours=1.4e-3, theirs=55e-3)  # this CPU: _int_mm's slow path
    assert native.keeps_avx2(ours=1.4e-3, theirs=1.0e-3)  # torch a little faster: not worth the risk
    assert not native.keeps_avx2(ours=3.0e-3, theirs=1.0e-3)  # torch 3x faster: it takes prefill
    timings = native._best_of(3, lambda: None, lambda: sum(range(1000)))
    assert len(timings) == 2 and all(t >= 0 for t in timings)
