"""Runs the model for a scheduled batch: builds the flattened inputs, owns the KV tensors, samples.

KV layout: per layer one tensor [slots, KVH, max_len, D] for keys and one for values. A prefill writes its
tokens at [slot, :, start:start+T]; a decode step writes one position per sequence and attends over the
first `length` positions of its slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blink.engine.sampler import sample
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
from blink.models.llama import LlamaModel


class SlotKVCache:
    def __init__(self, model: LlamaModel, num_slots: int, max_len: int, dtype: torch.dtype) -> None:
        cfg = model.config
        shape = (num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)  # [S, KVH, L, D]
        # torch.zeros maps untouched pages lazily, so memory grows with what sequences actually use
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]


class PrefillAttention:
    """One sequence's prompt tokens at positions [start, start+T) of its slot."""

    def __init__(self, cache: SlotKVCache, slot: int, start: int, length: int) -> None:
        self.cache, self.slot, self.start, self.end = cache, slot, start, start + length
        if start > 0:  # causal mask offset by the tokens already in the cache
            rows = torch.arange(start, self.end).unsqueeze(1)  # [T, 1]
            self.mask: torch.Tensor | None = torch.arange(self.end).unsqueeze(0) <= rows  # [T, start+T]
        else:
            self.mask = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer][self.slot], self.cache.v[layer][self.slot]  # [KVH, L, D]
        kc[:, self.start : self.end] = k.transpose(0, 1)  # [KVH, T, D]
        vc[:, self.start : self.end] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, T, D]
            kc[:, : self.end].unsqueeze(0),  # [1, KVH, start+T, D]
            vc[:, : self.end].unsqueeze(0),
            attn_mask=self.mask,
            is_causal=self.mask is None,
            enable_gqa=True,
        )  # [1, H, T, D]
        return out[0].transpose(0, 1)  # [T, H, D]


class DecodeAttention:
    """One new token per sequence; sequence i's token sits at position positions[i] of slot slots[i]."""

    def __init__(self, cache: SlotKVCache, slots: list[int], positions: list[int]) -> None:
        self.cache = cache
        self.slots = torch.tensor(slots)
        self.positions = torch.tensor(positions)
        self.length = max(positions) + 1
        self.mask = (torch.arange(self.length).unsqueeze(0) <= self.positions.unsqueeze(1))[
            :, None, None, :
        ]  # [B,1,1,L]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [S, KVH, L, D]
        kc[self.slots, :, self.positions] = k  # k [B, KVH, D]
        vc[self.slots, :, self.positions] = v
        keys = kc[self.slots, :, : self.length]  # [B, KVH, length, D]
        values = vc[self.slots, :, : self.length]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=self.mask, enable_gqa=True
        )  # q [B, H, 1, D] -> [B, H, 1, D]
        return out.squeeze(2)  # [B, H, D]


class ModelRunner:
    def __init__(self, model: LlamaModel, *, num_slots: int, max_len: int) -> None:
        self.model = model
        dtype = next(model.parameters()).dtype
        self.kv = SlotKVCache(model, num_slots, max_len, dtype)
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

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        tokens = seq.uncomputed_tokens()
        start = seq.num_computed
        assert seq.slot is not None
        backend = PrefillAttention(self.kv, seq.slot, start, len(tokens))
        positions = torch.arange(start, start + len(tokens))
        logits = self.model(torch.tensor(tokens), positions, backend, torch.tensor([len(tokens) - 1]))  # [1, V]
        seq.num_computed += len(tokens)
        return logits

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        positions = [s.num_computed for s in seqs]
        slots = [s.slot for s in seqs]
        assert all(slot is not None for slot in slots)
        backend = DecodeAttention(self.kv, slots, positions)  # type: ignore[arg-type]
        ids = torch.tensor([s.last_token for s in seqs])
        logits = self.model(ids, torch.tensor(positions), backend, torch.arange(len(seqs)))  # [B, V]
        for s in seqs:
            s.num_computed += 1
        return logits

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int]:
        """Forward every scheduled sequence's uncomputed tokens; return one sampled token per sequence,
        in `batch.sequences` order. Updates `num_computed`."""
        logits = [self._prefill(seq) for seq in batch.prefills]
        if batch.decodes:
            logits.append(self._decode(batch.decodes))
        seqs = batch.sequences
        return sample(torch.cat(logits), [s.params for s in seqs], [self._generators[s.request_id] for s in seqs])
