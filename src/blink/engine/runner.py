"""Runs the model for a scheduled batch: one forward over every scheduled token, paged KV, sampling.

KV layout: per layer one tensor [num_blocks * block_size, KVH, D] for keys and one for values; row
`block * block_size + offset` holds one token position (`slot`). A step's tokens of all sequences go through the
model flattened: prompt chunks and single decode tokens together, so weights are read once per step. Attention
writes each new token's K/V at its slot, then gathers each sequence's slots: the decoding sequences in one batched
SDPA call (padded, masked), each prompt chunk in its own (causal, offset by the tokens already cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blink.engine.sampler import sample
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
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


class PagedAttention:
    """The step's attention over the paged cache (see the module docstring)."""

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        chunks: list[_Chunk],
        decode_rows: torch.Tensor,
        decode_context: torch.Tensor,
        decode_mask: torch.Tensor | None,
    ) -> None:
        self.cache, self.slot_mapping, self.chunks = cache, slot_mapping, chunks
        self.decode_rows, self.decode_context, self.decode_mask = decode_rows, decode_context, decode_mask
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
        if len(self.decode_rows):
            b, length = self.decode_context.shape
            flat = self.decode_context.view(-1)
            keys = kc.index_select(0, flat).view(b, length, *kc.shape[1:]).transpose(1, 2)  # [B, KVH, L, D]
            values = vc.index_select(0, flat).view(b, length, *vc.shape[1:]).transpose(1, 2)
            out[self.decode_rows] = F.scaled_dot_product_attention(
                q[self.decode_rows].unsqueeze(2), keys, values, attn_mask=self.decode_mask, enable_gqa=True
            ).squeeze(2)  # q [B, H, 1, D] -> [B, H, D]
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

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _context(self, table: list[int], length: int) -> torch.Tensor:
        """Slots of positions [0, length) of a sequence with block table `table`."""
        blocks = torch.tensor(table[: -(-length // self.block_size)])
        return (blocks.unsqueeze(1) * self.block_size + self._offsets).view(-1)[:length]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, tables: list[list[int]]) -> list[int | None]:
        """Forward `batch.chunks[i]` tokens of each `batch.sequences[i]` (block table `tables[i]`) from its
        `num_computed`; return the sampled next token of each sequence whose chunk reached its last token, None
        for a sequence still partway through its prompt or prefill-only. Does not touch `num_computed`."""
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        chunks: list[_Chunk] = []
        decode_rows: list[int] = []
        decode_context: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, n, table in zip(batch.sequences, batch.chunks, tables, strict=True):
            start, row = seq.num_computed, len(ids)
            ids.extend([seq.last_token] if start + n == seq.num_tokens and n == 1 else seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(self._slots(table, start, start + n))
            # the decode path only for output tokens: a one-token prompt chunk (a pre-load, or a chunk shrunk by
            # the budget) would otherwise join the decoders' attention call and change its numerics (measured:
            # a live stream's greedy tokens changed when a pre-load's chunk shared its step)
            if n == 1 and start >= len(seq.prompt_token_ids):
                decode_rows.append(row)
                decode_context.append(self._context(table, start + 1))
            else:
                chunks.append(_Chunk(slice(row, row + n), start, self._context(table, start + n)))
            if start + n == seq.num_tokens and not seq.prefill_only:
                sample_rows.append(row + n - 1)
                sampled.append(seq)

        mask = None
        context = torch.zeros(0, 0, dtype=torch.long)
        if decode_context:
            lengths = torch.tensor([len(c) for c in decode_context])
            context = torch.zeros(len(decode_context), int(lengths.max()), dtype=torch.long)  # padding: slot 0
            for i, c in enumerate(decode_context):
                context[i, : len(c)] = c
            # always masked, even when the lengths agree: one kernel path whoever else decodes in the step
            mask = (torch.arange(context.shape[1]).unsqueeze(0) < lengths.unsqueeze(1))[:, None, None, :]
        backend = PagedAttention(
            self.kv, torch.tensor(slot_mapping), chunks, torch.tensor(decode_rows, dtype=torch.long), context, mask
        )
        tokens: list[int | None] = [None] * len(batch.sequences)
        logits = self.model(
            torch.tensor(ids), torch.tensor(positions), backend, torch.tensor(sample_rows, dtype=torch.long)
        )
        if not sampled:
            return tokens
        picked = sample(logits, [s.params for s in sampled], [self._generators[s.request_id] for s in sampled])
        where = {id(s): i for i, s in enumerate(batch.sequences)}
        for seq, token in zip(sampled, picked, strict=True):
            tokens[where[id(seq)]] = token
        return tokens
