"""The paged KV cache and the attention over it, for one engine step.

KV layout: per layer one tensor [num_blocks * block_size, KVH, D] for keys and one for values; row
`block * block_size + offset` holds one token position (`slot`). Attention writes each new token's K/V at its slot,
then reads each sequence's slots: every decode row (a decoding sequence's last token, and the guesses after it when
it verifies a proposal) in one call whose arithmetic per row does not depend on the other rows (the C kernel
reading the cache in place, `NativeDecodeRows`, or SDPA over gathered keys, `DecodeRows`), each prompt chunk in
groups aligned to KV blocks. A layer with a sliding window (LlamaConfig.window) lets each row see its last
`window` positions only, in every path.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blink.models import native
from blink.models.llama import LlamaModel


class StepInterrupted(Exception):
    """The step was called off partway (see the module docstring)."""


def zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor in memory of its own (an anonymous mapping) whose pages the OS backs on first write:
    the KV pool's resident memory grows with the blocks actually written, up to --kv-cache-mb, instead of all of
    it at start (torch.zeros writes every page: measured, the default 512 MiB pool was resident at once)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # private: an unwritten page reads as the kernel's shared zero page (in a shared mapping a read allocates it);
    # frombuffer keeps the mapping alive as long as the tensor
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages: where transparent huge pages are "always", one slot
        pages.madvise(mmap.MADV_NOHUGEPAGE)  # written would make 2 MiB of the pool resident
    return torch.frombuffer(pages, dtype=dtype).view(shape)


class PagedKVCache:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        cfg = model.config
        # [slots, KVH, D], plus one slot never written: the zeros that pad a gather (`zero_slot`)
        shape = (num_blocks * block_size + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [zero_pages(shape, dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [zero_pages(shape, dtype) for _ in range(cfg.num_hidden_layers)]
        self.block_size = block_size
        self.zero_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


@dataclass
class Chunk:
    rows: slice  # this chunk's rows in the flattened step
    start: int  # positions already cached before it
    context: torch.Tensor  # slots of positions [0, end of the block of its last row) of its sequence
    span: slice | None = None  # the same slots when they are one run (consecutive blocks): read as a view


# torch's CPU flash attention walks the keys in blocks of min(512, length), and a row's arithmetic depends on that
# split: padding every decode row's keys to a multiple of it makes the split, and so each row's result, the same
# whatever the other rows of the call are (measured: padding to the batch's longest changed results in the 7th
# digit, enough to flip a greedy choice now and then; fully masked extra blocks add exact zeros)
DECODE_KEY_QUANTUM = 512


def key_span(keys: int) -> int:
    """How many DECODE_KEY_QUANTUMs a decode row over `keys` positions reads (its padded key count / 512)."""
    return max(1, -(-keys // DECODE_KEY_QUANTUM))


class DecodeRows:
    """The step's decode rows: one per decoding sequence, or 1 + k when it verifies k guesses. Every row
    attends to exactly the positions up to its own and gets bit for bit the result it would get alone (tested):
    so a verified guess sees the same numbers plain decoding would. Sequences with the same number of rows share
    one SDPA call (`DecodeGroup`): in one call for all, every sequence would pay for the most rows any has (one
    stream verifying 5 guesses made 15 others' attention 6 rows each)."""

    def __init__(
        self, cache: PagedKVCache, starts: list[int], rows: list[slice], contexts: list[torch.Tensor], heads: int
    ) -> None:
        by_rows: dict[int, list[int]] = {}
        for i, s in enumerate(rows):
            by_rows.setdefault(s.stop - s.start, []).append(i)
        self.groups = [
            DecodeGroup(cache, [starts[i] for i in m], [rows[i] for i in m], [contexts[i] for i in m], heads)
            for m in by_rows.values()
        ]

    def attend(
        self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor, window: int | None
    ) -> None:
        for group in self.groups:
            group.attend(kc, vc, q, out, window)


class DecodeGroup:
    """Decode rows of sequences with the same number of rows R, in one SDPA call.

    A sequence's keys are gathered once, padded with the cache's zero slot to [B, L, KVH, D] (L a multiple of
    DECODE_KEY_QUANTUM); its R rows ride in the head dimension as q [B, KVH * R * G, 1, D] (G query heads per KV
    head, grouped so that enable_gqa maps each onto its KV head), each with its own mask row."""

    def __init__(
        self, cache: PagedKVCache, starts: list[int], rows: list[slice], contexts: list[torch.Tensor], heads: int
    ) -> None:
        b, kvh, dim = len(rows), cache.k[0].shape[1], cache.k[0].shape[2]
        r = max(s.stop - s.start for s in rows)
        longest = max(len(c) for c in contexts)
        length = -(-longest // DECODE_KEY_QUANTUM) * DECODE_KEY_QUANTUM
        self.b, self.r, self.length, self.kvh, self.g, self.dim = b, r, length, kvh, heads // kvh, dim
        # one gather per layer: each sequence's slots, then the cache's zero slot up to the padded length
        self.slots = torch.full((b, length), cache.zero_slot, dtype=torch.long)
        for i, c in enumerate(contexts):
            self.slots[i, : len(c)] = c
        self.slots = self.slots.view(-1)
        # row j of sequence i is position starts[i] + j and sees keys [0, starts[i] + j]; padding rows see key 0
        lengths = torch.ones(b, r, dtype=torch.long)
        index = torch.zeros(b, r, dtype=torch.long)  # each (sequence, row) -> its row in the step
        valid = torch.zeros(b, r, dtype=torch.bool)
        for i, (start, s) in enumerate(zip(starts, rows, strict=True)):
            n = s.stop - s.start
            lengths[i, :n] = torch.arange(start + 1, start + n + 1)
            index[i, :] = s.start
            index[i, :n] = torch.arange(s.start, s.stop)
            valid[i, :n] = True
        self.lengths = lengths.unsqueeze(-1)  # [B, R, 1]
        self.masks: dict[int | None, torch.Tensor] = {}  # by sliding window (None: all keys), made on first use
        self.index, self.valid = index.view(-1), valid.view(-1)
        self.out_rows = self.index[self.valid]

    def _mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            b, r, length, kvh, g = self.b, self.r, self.length, self.kvh, self.g
            keys = torch.arange(length)
            mask = keys < self.lengths  # [B, R, L]
            if window is not None:  # a row sees its last `window` positions (itself included)
                mask &= keys >= self.lengths - window
            self.masks[window] = (
                mask[:, None, :, None, :].expand(b, kvh, r, g, length).reshape(b, kvh * r * g, 1, length)
            )
        return self.masks[window]

    def attend(
        self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor, window: int | None
    ) -> None:
        b, r, length, kvh, g, d = self.b, self.r, self.length, self.kvh, self.g, self.dim
        keys = kc.index_select(0, self.slots).to(q.dtype).view(b, length, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        values = vc.index_select(0, self.slots).to(q.dtype).view(b, length, kvh, d).transpose(1, 2)
        qs = q.index_select(0, self.index).view(b, r, kvh, g, d).transpose(1, 2).reshape(b, kvh * r * g, 1, d)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=self._mask(window), enable_gqa=True)
        o = o.view(b, kvh, r, g, d).transpose(1, 2).reshape(b * r, kvh * g, d)
        out[self.out_rows] = o[self.valid]


class NativeDecodeRows:
    """The step's decode rows through blink's C kernel (models/native.py): every row reads its own keys and
    values in place in the cache, through its sequence's slots: no gather, no padding, one call per layer for
    all rows. Each (row, head) is computed alone in a fixed order, so a row's result is bit for bit the same
    whatever shares its step (tested), as with `DecodeRows`; its numbers differ from SDPA's in the last bits."""

    def __init__(self, starts: list[int], rows: list[slice], contexts: list[torch.Tensor]) -> None:
        index: list[int] = []
        lengths: list[int] = []
        offsets: list[int] = []
        at = 0
        for start, s, context in zip(starts, rows, contexts, strict=True):
            for j in range(s.stop - s.start):  # row j is position start + j and sees keys [0, start + j]
                index.append(s.start + j)
                lengths.append(start + j + 1)
                offsets.append(at)
            at += len(context)
        self.rows, self.lengths, self.offsets = torch.tensor(index), torch.tensor(lengths), torch.tensor(offsets)
        self.slots = torch.cat(contexts)
        # by sliding window: each row's (key count, first slot), its last `window` positions (made on first use)
        self.spans: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {None: (self.lengths, self.offsets)}

    def attend(
        self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor, window: int | None
    ) -> None:
        if window is not None and window not in self.spans:
            skip = (self.lengths - window).clamp(min=0)
            self.spans[window] = self.lengths - skip, self.offsets + skip
        lengths, offsets = self.spans[window]
        native.attend_decode(q, kc, vc, out, self.rows, lengths, offsets, self.slots)


class PagedAttention:
    """The step's attention over the paged cache (see the module docstring)."""

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        chunks: list[Chunk],
        decode: DecodeRows | NativeDecodeRows | None,
        stop: Callable[[int], bool] | None = None,
        windows: list[int | None] | None = None,
    ) -> None:
        self.cache, self.slot_mapping, self.chunks, self.decode = cache, slot_mapping, chunks, decode
        self.stop = stop  # layer -> whether the step is called off before it
        self.windows = windows  # per layer: its sliding window (a row sees its last `window` positions), or None
        # prompt rows attend one KV block at a time, as if the whole block were in the step: the block's rows as
        # queries (rows outside this chunk padded), the keys up to the block's end (positions not computed yet are
        # masked), so a row's arithmetic depends on its position only, never on how its prompt was chunked: a
        # cold prefill, chunked prefill around other streams, a prefix-cache hit and a pre-load give the same K/V
        # (measured: chunk-shaped attention calls made greedy answers differ between such runs)
        bs = cache.block_size
        within = torch.ones(bs, bs, dtype=torch.bool).tril()
        # per chunk: (its rows in the step, their offset in the block, the block's end, the mask)
        self.groups: list[list[tuple[slice, int, int, torch.Tensor]]] = []
        for chunk in chunks:
            groups: list[tuple[slice, int, int, torch.Tensor]] = []
            self.groups.append(groups)
            first, end = chunk.start, chunk.start + chunk.rows.stop - chunk.rows.start
            lo = first
            while lo < end:
                block_start = lo // bs * bs
                hi = min(end, block_start + bs)
                rows = slice(chunk.rows.start + lo - first, chunk.rows.start + hi - first)
                mask = torch.ones(bs, block_start + bs, dtype=torch.bool)  # earlier blocks: all visible
                mask[:, block_start:] = within
                groups.append((rows, lo - block_start, block_start + bs, mask))
                lo = hi
        self._windowed: dict[tuple[int, int], torch.Tensor] = {}  # (block_start, window) -> mask, on first use

    def _mask(self, mask: torch.Tensor, block_end: int, window: int | None) -> torch.Tensor:
        """A prompt group's mask, narrowed to each row's last `window` positions for a sliding-window layer."""
        if window is None or block_end <= window:
            return mask
        bs = self.cache.block_size
        key = (block_end - bs, window)
        if key not in self._windowed:
            positions = torch.arange(block_end - bs, block_end).unsqueeze(1)  # the block's rows
            self._windowed[key] = mask & (torch.arange(block_end) > positions - window)
        return self._windowed[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.stop is not None and self.stop(layer):
            raise StepInterrupted
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [slots, KVH, D]
        kc.index_copy_(0, self.slot_mapping, k.to(kc.dtype))  # an fp16 cache: rounded to nearest even
        vc.index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        out = torch.empty_like(q)  # [N, H, D]
        bs = self.cache.block_size
        window = self.windows[layer] if self.windows else None
        for chunk, groups in zip(self.chunks, self.groups, strict=True):
            if chunk.span is not None:  # no copy: the same [L, KVH, D] layout as a gather, so the same numbers
                keys, values = kc[chunk.span].transpose(0, 1).unsqueeze(0), vc[chunk.span].transpose(0, 1).unsqueeze(0)
            else:  # [1, KVH, L, D], gathered once per layer
                keys = kc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)
                values = vc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)
            keys, values = keys.to(q.dtype), values.to(q.dtype)  # an fp16 cache: widened, exactly
            for rows, offset, block_end, mask in groups:
                n = rows.stop - rows.start
                queries = q.new_zeros(1, q.shape[1], bs, q.shape[2])  # [1, H, block, D]
                queries[0, :, offset : offset + n] = q[rows].transpose(0, 1)
                out[rows] = F.scaled_dot_product_attention(
                    queries,
                    keys[:, :, :block_end],
                    values[:, :, :block_end],
                    attn_mask=self._mask(mask, block_end, window),
                    enable_gqa=True,
                )[0, :, offset : offset + n].transpose(0, 1)
        if self.decode is not None:
            self.decode.attend(kc, vc, q, out, window)
        return out
