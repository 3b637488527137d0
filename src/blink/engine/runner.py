"""Runs the model for a scheduled batch: one forward over every scheduled token, paged KV, sampling.

KV layout: per layer one tensor [num_blocks * block_size, KVH, D] for keys and one for values; row
`block * block_size + offset` holds one token position (`slot`). A step's tokens of all sequences go through the
model flattened: prompt chunks, decode tokens and speculative guesses together, so weights are read once per step.
Attention writes each new token's K/V at its slot, then reads each sequence's slots: every decode row (a
decoding sequence's last token, and the guesses after it when it verifies a proposal) in one call whose
arithmetic per row does not depend on the other rows (the C kernel reading the cache in place,
`_NativeDecodeRows`, or SDPA over gathered keys, `_DecodeRows`), each prompt chunk in groups aligned to KV
blocks. Both int8 weight formats are batch-invariant too, so a token's logits never depend on its step's company:
speculative decoding and plain decoding give the same greedy tokens.

A step can be called off partway (`ModelRunner.interrupt`, set from another thread): attention checks it before
each of the first three quarters of the layers and raises `StepInterrupted`. Nothing of the step counts then: the
K/V it wrote lie past every sequence's `num_computed`, in blocks no other sequence reads, and are written again
when the step is run again; no token was sampled, so no random stream moved.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blink.engine.sampler import Proposal, sample, verify
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
from blink.models import native
from blink.models.llama import LlamaModel


class StepInterrupted(Exception):
    """The step was called off partway (see the module docstring)."""


class PagedKVCache:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        cfg = model.config
        # [slots, KVH, D], plus one slot never written: the zeros that pad a gather (`zero_slot`)
        shape = (num_blocks * block_size + 1, cfg.num_key_value_heads, cfg.head_dim)
        # torch.zeros maps untouched pages lazily: resident memory grows with the blocks actually written
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.block_size = block_size
        self.zero_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


@dataclass
class _Chunk:
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


class _DecodeRows:
    """The step's decode rows: one per decoding sequence, or 1 + k when it verifies k guesses. Every row
    attends to exactly the positions up to its own and gets bit for bit the result it would get alone (tested):
    so a verified guess sees the same numbers plain decoding would. Sequences with the same number of rows share
    one SDPA call (`_DecodeGroup`): in one call for all, every sequence would pay for the most rows any has (one
    stream verifying 5 guesses made 15 others' attention 6 rows each)."""

    def __init__(
        self, cache: PagedKVCache, starts: list[int], rows: list[slice], contexts: list[torch.Tensor], heads: int
    ) -> None:
        by_rows: dict[int, list[int]] = {}
        for i, s in enumerate(rows):
            by_rows.setdefault(s.stop - s.start, []).append(i)
        self.groups = [
            _DecodeGroup(cache, [starts[i] for i in m], [rows[i] for i in m], [contexts[i] for i in m], heads)
            for m in by_rows.values()
        ]

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        for group in self.groups:
            group.attend(kc, vc, q, out)


class _DecodeGroup:
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
        mask = torch.arange(length) < lengths.unsqueeze(-1)  # [B, R, L]
        self.mask = mask[:, None, :, None, :].expand(b, kvh, r, self.g, length).reshape(b, kvh * r * self.g, 1, length)
        self.index, self.valid = index.view(-1), valid.view(-1)
        self.out_rows = self.index[self.valid]

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        b, r, length, kvh, g, d = self.b, self.r, self.length, self.kvh, self.g, self.dim
        keys = kc.index_select(0, self.slots).view(b, length, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        values = vc.index_select(0, self.slots).view(b, length, kvh, d).transpose(1, 2)
        qs = q.index_select(0, self.index).view(b, r, kvh, g, d).transpose(1, 2).reshape(b, kvh * r * g, 1, d)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=self.mask, enable_gqa=True)
        o = o.view(b, kvh, r, g, d).transpose(1, 2).reshape(b * r, kvh * g, d)
        out[self.out_rows] = o[self.valid]


class _NativeDecodeRows:
    """The step's decode rows through blink's C kernel (models/native.py): every row reads its own keys and
    values in place in the cache, through its sequence's slots: no gather, no padding, one call per layer for
    all rows. Each (row, head) is computed alone in a fixed order, so a row's result is bit for bit the same
    whatever shares its step (tested), as with `_DecodeRows`; its numbers differ from SDPA's in the last bits."""

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

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        native.attend_decode(q, kc, vc, out, self.rows, self.lengths, self.offsets, self.slots)


class PagedAttention:
    """The step's attention over the paged cache (see the module docstring)."""

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        chunks: list[_Chunk],
        decode: _DecodeRows | _NativeDecodeRows | None,
        stop: Callable[[int], bool] | None = None,
    ) -> None:
        self.cache, self.slot_mapping, self.chunks, self.decode = cache, slot_mapping, chunks, decode
        self.stop = stop  # layer -> whether the step is called off before it
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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.stop is not None and self.stop(layer):
            raise StepInterrupted
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [slots, KVH, D]
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)  # [N, H, D]
        bs = self.cache.block_size
        for chunk, groups in zip(self.chunks, self.groups, strict=True):
            if chunk.span is not None:  # no copy: the same [L, KVH, D] layout as a gather, so the same numbers
                keys, values = kc[chunk.span].transpose(0, 1).unsqueeze(0), vc[chunk.span].transpose(0, 1).unsqueeze(0)
            else:  # [1, KVH, L, D], gathered once per layer
                keys = kc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)
                values = vc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)
            for rows, offset, block_end, mask in groups:
                n = rows.stop - rows.start
                queries = q.new_zeros(1, q.shape[1], bs, q.shape[2])  # [1, H, block, D]
                queries[0, :, offset : offset + n] = q[rows].transpose(0, 1)
                out[rows] = F.scaled_dot_product_attention(
                    queries, keys[:, :, :block_end], values[:, :, :block_end], attn_mask=mask, enable_gqa=True
                )[0, :, offset : offset + n].transpose(0, 1)
        if self.decode is not None:
            self.decode.attend(kc, vc, q, out)
        return out


class ModelRunner:
    def __init__(self, model: LlamaModel, *, num_blocks: int, block_size: int, native_kernels: bool = True) -> None:
        self.model = model
        self.dtype = model.embed_tokens.weight.dtype
        # decode attention in the C kernel: fp32 caches (every format but bf16), when it is built
        self.native = native_kernels and native.available() and self.dtype == torch.float32
        self.kv = PagedKVCache(model, num_blocks, block_size, self.dtype)
        self.block_size = block_size
        self._offsets = torch.arange(block_size)
        self._generators: dict[str, torch.Generator | None] = {}
        # set from any thread to call off the step running (if it is interruptible and not too far along)
        self.interrupt = threading.Event()
        self._cut = (3 * model.config.num_hidden_layers) // 4  # past it, finishing costs less than a redo

    def _stop(self, layer: int) -> bool:
        return layer < self._cut and self.interrupt.is_set()

    def add(self, seq: Sequence) -> None:
        gen = None
        if not seq.params.greedy:
            gen = torch.Generator()
            if seq.params.seed is not None:
                gen.manual_seed(seq.params.seed)
            else:
                gen.seed()
        self._generators[seq.request_id] = gen

    def remove(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def generator(self, request_id: str) -> torch.Generator | None:
        """The sequence's own random stream (None: greedy)."""
        return self._generators.get(request_id)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _context(self, table: list[int], length: int) -> torch.Tensor:
        """Slots of positions [0, length) of a sequence with block table `table`."""
        blocks = torch.tensor(table[: -(-length // self.block_size)])
        return (blocks.unsqueeze(1) * self.block_size + self._offsets).view(-1)[:length]

    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        tables: list[list[int]],
        guesses: list[list[int]] | None = None,
        *,
        interruptible: bool = False,
    ) -> tuple[torch.Tensor, list[slice | None]]:
        """Forward `batch.chunks[i]` tokens of each `batch.sequences[i]` (block table `tables[i]`) from its
        `num_computed`, and for a decoding sequence with `guesses[i]` those guesses after its last token (the table
        must hold them). Returns the logits of the rows to sample from and, per sequence, its rows in them: the
        last row of a chunk that reaches the sequence's end, all 1 + k rows of a verification, None for a
        sequence still partway through its prompt or prefill-only. Does not touch `num_computed`. `interruptible`:
        `interrupt` may call it off (StepInterrupted)."""
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        chunks: list[_Chunk] = []
        decode_starts: list[int] = []
        decode_rows: list[slice] = []
        decode_context: list[torch.Tensor] = []
        sample_rows: list[int] = []
        where: list[slice | None] = []
        for i, (seq, n, table) in enumerate(zip(batch.sequences, batch.chunks, tables, strict=True)):
            start, row = seq.num_computed, len(ids)
            extra = guesses[i] if guesses else []
            decoding = n == 1 and start >= len(seq.prompt_token_ids) and start + 1 == seq.num_tokens
            if decoding:
                ids.append(seq.last_token)
                ids.extend(extra)
                n += len(extra)
            else:
                assert not extra, "guesses only for a decoding sequence"
                ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(self._slots(table, start, start + n))
            # the decode path only for output tokens: a one-token prompt chunk (a pre-load, or a chunk shrunk by
            # the budget) would otherwise join the decoders' attention call and change its numerics (measured:
            # a live stream's greedy tokens changed when a pre-load's chunk shared its step)
            if decoding:
                decode_starts.append(start)
                decode_rows.append(slice(row, row + n))
                decode_context.append(self._context(table, start + n))
            else:  # its keys: up to the end of its last block (see PagedAttention)
                keys_end = -(-(start + n) // self.block_size) * self.block_size
                used = table[: keys_end // self.block_size]
                one_run = all(b == used[0] + i for i, b in enumerate(used))
                span = slice(used[0] * self.block_size, used[0] * self.block_size + keys_end) if one_run else None
                chunks.append(_Chunk(slice(row, row + n), start, self._context(table, keys_end), span))
            if start + n >= seq.num_tokens and not seq.prefill_only:
                first = len(sample_rows)
                sample_rows.extend(range(row + n - 1 - len(extra), row + n))
                where.append(slice(first, len(sample_rows)))
            else:
                where.append(None)
        decode: _DecodeRows | _NativeDecodeRows | None = None
        if decode_rows and self.native:
            decode = _NativeDecodeRows(decode_starts, decode_rows, decode_context)
        elif decode_rows:
            heads = self.model.config.num_attention_heads
            decode = _DecodeRows(self.kv, decode_starts, decode_rows, decode_context, heads)
        backend = PagedAttention(
            self.kv, torch.tensor(slot_mapping), chunks, decode, self._stop if interruptible else None
        )
        logits = self.model(
            torch.tensor(ids), torch.tensor(positions), backend, torch.tensor(sample_rows, dtype=torch.long)
        )
        return logits, where

    def run(
        self,
        batch: ScheduledBatch,
        tables: list[list[int]],
        proposals: list[Proposal | None] | None = None,
        *,
        interruptible: bool = False,
    ) -> list[list[int]]:
        """Forward the batch (see `forward`) and pick tokens: per sequence, [] while its prompt is partway or it
        is prefill-only, one sampled token, or for a sequence with a proposal the 1 to k + 1 tokens its
        verification emits."""
        guesses = [p.tokens if p else [] for p in proposals] if proposals else None
        logits, where = self.forward(batch, tables, guesses, interruptible=interruptible)
        out: list[list[int]] = [[] for _ in batch.sequences]
        plain = [i for i, w in enumerate(where) if w is not None and not (guesses and guesses[i])]
        if plain:
            seqs = [batch.sequences[i] for i in plain]
            rows = torch.tensor([where[i].start for i in plain])  # type: ignore[union-attr]
            picked = sample(
                logits.index_select(0, rows), [s.params for s in seqs], [self._generators[s.request_id] for s in seqs]
            )
            for i, token in zip(plain, picked, strict=True):
                out[i] = [token]
        if proposals:
            for i, proposal in enumerate(proposals):
                w = where[i]
                if proposal and proposal.tokens and w is not None:
                    seq = batch.sequences[i]
                    out[i] = verify(logits[w], proposal, seq.params, self._generators[seq.request_id])
        return out
