"""The runner's decode attention is batch-invariant: a decode row gets bit for bit the same output alone, next to
other sequences (of other lengths: keys padded further) and as the first row of a verification of guesses. Greedy
speculative decoding's identical output rests on it. Both implementations: torch's SDPA over gathered keys
(`DecodeRows`) and the C kernel reading the cache in place (`NativeDecodeRows`). With 2 threads, as served: on
some CPUs MKL's per-call choices broke the SDPA one (blink/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from blink.engine.attention import DecodeRows, NativeDecodeRows
from blink.models import native

KVH, GROUP, DIM = 3, 3, 64
HEADS = KVH * GROUP
SLOTS = 4096


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


KINDS = ["sdpa", "native"] if native.available() else ["sdpa"]


def attend(
    kc: torch.Tensor, vc: torch.Tensor, seqs: list[tuple[int, torch.Tensor, torch.Tensor]], kind: str = "sdpa"
) -> torch.Tensor:
    """seqs: (position of the first row, its rows' queries [R, H, D], slots of its keys) -> output rows [N, H, D]."""
    cache = SimpleNamespace(k=[kc], zero_slot=SLOTS)
    starts, rows, contexts, queries, at = [], [], [], [], 0
    for start, q, slots in seqs:
        starts.append(start)
        rows.append(slice(at, at + len(q)))
        contexts.append(slots[: start + len(q)])
        queries.append(q)
        at += len(q)
    q = torch.cat(queries)
    out = torch.empty_like(q)
    if kind == "native":
        NativeDecodeRows(starts, rows, contexts).attend(kc, vc, q, out, None)
    else:
        DecodeRows(cache, starts, rows, contexts, q.shape[1]).attend(kc, vc, q, out, None)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-cache", "fp16-cache"])
def test_a_decode_row_is_the_same_alone_batched_and_verifying_guesses(
    two_threads: None, seed: int, kind: str, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(SLOTS + 1, KVH, DIM, generator=gen).to(dtype)
    vc = torch.randn(SLOTS + 1, KVH, DIM, generator=gen).to(dtype)
    kc[SLOTS] = vc[SLOTS] = 0  # the zero slot
    order = torch.randperm(SLOTS, generator=gen)  # paged: a sequence's slots anywhere in the cache
    start = 100 + 50 * seed
    mine = order[:1024]
    row = torch.randn(1, HEADS, DIM, generator=gen)  # queries stay fp32 whatever the cache
    alone = attend(kc, vc, [(start, row, mine)], kind)
    others = [(300 + 150 * i, torch.randn(1, HEADS, DIM, generator=gen), order[1024 * (i + 1) :]) for i in range(3)]
    batched = attend(kc, vc, [(start, row, mine), *others], kind)  # one over 512 keys: SDPA pads all to 1024
    guesses = torch.randn(4, HEADS, DIM, generator=gen)
    verifying = attend(kc, vc, [(start, torch.cat([row, guesses]), mine), others[0]], kind)
    assert torch.equal(alone[0], batched[0])
    assert torch.equal(alone[0], verifying[0])


@pytest.mark.parametrize("kind", KINDS)
def test_decode_attention_is_causal_attention_over_the_rows_own_keys(two_threads: None, kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    kc = torch.randn(SLOTS + 1, KVH, DIM, generator=gen)
    vc = torch.randn(SLOTS + 1, KVH, DIM, generator=gen)
    kc[SLOTS] = vc[SLOTS] = 0
    order = torch.randperm(SLOTS, generator=gen)
    seqs = [(40, torch.randn(3, HEADS, DIM, generator=gen), order[:100]), (7, torch.randn(1, HEADS, DIM), order[100:])]
    got = attend(kc, vc, seqs, kind)
    at = 0
    for start, q, slots in seqs:
        for j in range(len(q)):  # row j sees positions [0, start + j]
            keys = kc[slots[: start + j + 1]].transpose(0, 1)  # [KVH, L, D]
            values = vc[slots[: start + j + 1]].transpose(0, 1)
            want = F.scaled_dot_product_attention(q[j].unsqueeze(1), keys, values, enable_gqa=True)  # [H, 1, D]
            torch.testing.assert_close(got[at + j], want[:, 0], rtol=1e-5, atol=1e-5)
        at += len(q)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [GROUP, 9], ids=["grouped-heads", "one-head-at-a-time"])  # 9: past the C kernel's 8
def test_an_fp16_cache_gives_what_an_fp32_cache_of_the_same_values_gives(
    two_threads: None, kind: str, group: int
) -> None:
    """fp16 keys and values are widened to fp32 exactly as they are read, in every path (the C kernel's grouped
    and one-head paths, SDPA's): the same bits as an fp32 cache holding those values."""
    gen = torch.Generator().manual_seed(11)
    half_k = torch.randn(SLOTS + 1, KVH, DIM, generator=gen).half()
    half_v = (torch.randn(SLOTS + 1, KVH, DIM, generator=gen) * 1e-3).half()  # small values: some subnormal
    half_k[SLOTS] = half_v[SLOTS] = 0
    order = torch.randperm(SLOTS, generator=gen)
    heads = KVH * group
    seqs = [(70, torch.randn(2, heads, DIM, generator=gen), order[:300]), (5, torch.randn(1, heads, DIM), order[300:])]
    assert torch.equal(attend(half_k, half_v, seqs, kind), attend(half_k.float(), half_v.float(), seqs, kind))


def test_sequences_share_an_attention_call_only_with_ones_of_as_many_rows() -> None:
    """One stream verifying 5 guesses must not make the others' attention 6 rows each (16 streams ran 0.8-0.93x
    slower with speculation on when they did)."""
    cache = SimpleNamespace(k=[torch.zeros(SLOTS + 1, KVH, DIM)], zero_slot=SLOTS)
    rows = [slice(0, 6), slice(6, 7), slice(7, 8), slice(8, 10)]
    contexts = [torch.arange(100 + i * 200, 400 + i * 200) for i in range(4)]
    decode = DecodeRows(cache, [294, 299, 299, 298], rows, contexts, HEADS)  # type: ignore[arg-type]
    assert sorted((g.r, g.b) for g in decode.groups) == [(1, 2), (2, 1), (6, 1)]
