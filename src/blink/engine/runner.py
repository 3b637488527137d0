"""Runs the model for a scheduled batch: one forward over every scheduled token, paged KV, sampling.

KV layout: per layer one tensor [num_blocks * block_size, KVH, D] for keys and one for values; row
`block * block_size + offset` holds one token position (`slot`). A step's tokens of all sequences go through the
model flattened: prompt chunks, decode tokens and speculative guesses together, so weights are read once per step.
Attention writes each new token's K/V at its slot, then gathers each sequence's slots: every decode row (a
decoding sequence's last token, and the guesses after it when it verifies a proposal) in one SDPA call whose
arithmetic per row does not depend on the other rows (`_DecodeRows`), each prompt chunk in groups aligned to KV
blocks. Both int8 weight formats are batch-invariant too, so a token's logits never depend on its step's company:
speculative decoding and plain decoding give the same greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blink.engine.sampler import sample
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
from blink.engine.speculative import Proposal, verify
from blink.models.llama import LlamaModel


class PagedKVCache:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        cfg = model.config
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)  # [slots, KVH, D]
        # torch.zeros maps untouched pages lazily: resident memory grows with the blocks actually written
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


@dataclass
class _Chunk:
    rows: slice  # this chunk's rows in the flattened step
    start: int  # positions already cached before it
    context: torch.Tensor  # slots of positions [0, start + rows) of its sequence


# torch's CPU flash attention walks the keys in blocks of min(512, length), and a row's arithmetic depends on that
# split: padding every decode row's keys to a multiple of it makes the split, and so each row's result, the same
# whatever the other rows of the call are (measured: padding to the batch's longest changed results in the 7th
# digit, enough to flip a greedy choice now and then; fully masked extra blocks add exact zeros)
DECODE_KEY_QUANTUM = 512


class _DecodeRows:
    """The step's decode rows: one per decoding sequence, or 1 + k when it verifies k guesses. Every row
    attends to exactly the positions up to its own, in one SDPA call for all of them, and gets bit for bit the
    result it would get alone (tested): so a verified guess sees the same numbers plain decoding would.

    A sequence's keys are gathered once into a zero-padded buffer [B, L, KVH, D] (L a multiple of
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
        self.src = torch.cat(contexts)
        self.dst = torch.cat([torch.arange(len(c)) + i * length for i, c in enumerate(contexts)])
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
        self.keys = torch.zeros(b * length, kvh, dim, dtype=cache.k[0].dtype)  # padding stays zero: finite
        self.values = torch.zeros_like(self.keys)

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        b, r, length, kvh, g, d = self.b, self.r, self.length, self.kvh, self.g, self.dim
        self.keys.index_copy_(0, self.dst, kc.index_select(0, self.src))
        self.values.index_copy_(0, self.dst, vc.index_select(0, self.src))
        keys = self.keys.view(b, length, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        values = self.values.view(b, length, kvh, d).transpose(1, 2)
        qs = q.index_select(0, self.index).view(b, r, kvh, g, d).transpose(1, 2).reshape(b, kvh * r * g, 1, d)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=self.mask, enable_gqa=True)
        o = o.view(b, kvh, r, g, d).transpose(1, 2).reshape(b * r, kvh * g, d)
        out[self.out_rows] = o[self.valid]


class PagedAttention:
    """The step's attention over the paged cache (see the module docstring)."""

    def __init__(
        self, cache: PagedKVCache, slot_mapping: torch.Tensor, chunks: list[_Chunk], decode: _DecodeRows | None
    ) -> None:
        self.cache, self.slot_mapping, self.chunks, self.decode = cache, slot_mapping, chunks, decode
        # prompt rows attend in groups aligned to KV blocks, each over exactly the keys up to its last position:
        # a row's arithmetic then depends only on its position, never on how its prompt was chunked (a cold
        # prefill, a prefix-cache hit and a pre-load give the same K/V; measured: chunk-shaped SDPA calls made
        # greedy answers differ between a pre-loaded prompt and the same prompt served cold)
        self.groups: list[list[tuple[slice, int, torch.Tensor]]] = []  # per chunk: (rows in the step, keys, mask)
        for chunk in chunks:
            groups: list[tuple[slice, int, torch.Tensor]] = []
            self.groups.append(groups)
            first, end = chunk.start, chunk.start + chunk.rows.stop - chunk.rows.start
            lo = first
            while lo < end:  # rows of one KV block at a time (a chunk starting mid-block begins with its rest)
                hi = min(end, (lo // cache.block_size + 1) * cache.block_size)
                rows = slice(chunk.rows.start + lo - first, chunk.rows.start + hi - first)
                positions = torch.arange(lo, hi).unsqueeze(1)  # [g, 1]
                groups.append((rows, hi, torch.arange(hi).unsqueeze(0) <= positions))
                lo = hi

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [slots, KVH, D]
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)  # [N, H, D]
        for chunk, groups in zip(self.chunks, self.groups, strict=True):
            keys = kc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D], gathered once
            values = vc.index_select(0, chunk.context).transpose(0, 1).unsqueeze(0)
            for rows, length, mask in groups:
                out[rows] = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1).unsqueeze(0),  # [1, H, g, D]
                    keys[:, :, :length],
                    values[:, :, :length],
                    attn_mask=mask,
                    enable_gqa=True,
                )[0].transpose(0, 1)
        if self.decode is not None:
            self.decode.attend(kc, vc, q, out)
        return out


class ModelRunner:
    def __init__(self, model: LlamaModel, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.dtype = model.embed_tokens.weight.dtype
        self.kv = PagedKVCache(model, num_blocks, block_size, self.dtype)
        self.block_size = block_size
        self._offsets = torch.arange(block_size)
        self._generators: dict[str, torch.Generator | None] = {}

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
        self, batch: ScheduledBatch, tables: list[list[int]], guesses: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, list[slice | None]]:
        """Forward `batch.chunks[i]` tokens of each `batch.sequences[i]` (block table `tables[i]`) from its
        `num_computed`, and for a decoding sequence with `guesses[i]` those guesses after its last token (the table
        must hold them). Returns the logits of the rows to sample from and, per sequence, its rows in them: the
        last row of a chunk that reaches the sequence's end, all 1 + k rows of a verification, None for a
        sequence still partway through its prompt or prefill-only. Does not touch `num_computed`."""
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
            else:
                chunks.append(_Chunk(slice(row, row + n), start, self._context(table, start + n)))
            if start + n >= seq.num_tokens and not seq.prefill_only:
                first = len(sample_rows)
                sample_rows.extend(range(row + n - 1 - len(extra), row + n))
                where.append(slice(first, len(sample_rows)))
            else:
                where.append(None)
        decode = None
        if decode_rows:
            heads = self.model.config.num_attention_heads
            decode = _DecodeRows(self.kv, decode_starts, decode_rows, decode_context, heads)
        backend = PagedAttention(self.kv, torch.tensor(slot_mapping), chunks, decode)
        logits = self.model(
            torch.tensor(ids), torch.tensor(positions), backend, torch.tensor(sample_rows, dtype=torch.long)
        )
        return logits, where

    def run(
        self, batch: ScheduledBatch, tables: list[list[int]], proposals: list[Proposal | None] | None = None
    ) -> list[list[int]]:
        """Forward the batch (see `forward`) and pick tokens: per sequence, [] while its prompt is partway or it
        is prefill-only, one sampled token, or for a sequence with a proposal the 1 to k + 1 tokens its
        verification emits."""
        guesses = [p.tokens if p else [] for p in proposals] if proposals else None
        logits, where = self.forward(batch, tables, guesses)
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
