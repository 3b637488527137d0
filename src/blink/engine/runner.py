"""Runs the model for a scheduled batch: one forward over every scheduled token, paged KV, sampling.

A step's tokens of all sequences go through the model flattened: prompt chunks, decode tokens and speculative
guesses together, so weights are read once per step. Attention over the paged KV cache (attention.py) computes each
decode row alone, whatever shares its step, and prompt rows by their position only. Both int8 weight formats are
batch-invariant too, so a token's logits never depend on its step's company:
speculative decoding and plain decoding give the same greedy tokens.

A decode-only step of a fused q4 model runs every layer in one native call (fused_decode.py), with the same numbers.

A step can be called off partway (`ModelRunner.interrupt`, set from another thread): attention (or the native
step) checks it before each of the first three quarters of the layers and raises `StepInterrupted`. Nothing of
the step counts then: the K/V it wrote lie past every sequence's `num_computed`, in blocks no other sequence
reads, and are written again when the step is run again; no token was sampled, so no random stream moved.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from blink.engine.attention import (
    Chunk,
    DecodeRows,
    NativeDecodeRows,
    PagedAttention,
    PagedKVCache,
)
from blink.engine.fused_decode import FusedDecoder
from blink.engine.sampler import Proposal, sample, verify
from blink.engine.scheduler import ScheduledBatch
from blink.engine.sequence import Sequence
from blink.models import native
from blink.models.llama import LlamaModel


def kv_cache_dtype(model: LlamaModel, choice: str = "auto") -> torch.dtype:
    """The KV cache's dtype for --kv-cache-dtype `choice`. auto: fp16 for a model with quantized linear layers
    (q4, w8a8, int8: their activations are fp32, and fp16 keys and values are what llama.cpp keeps by default, at
    half the bytes per token), the model's own dtype otherwise (fp32 and bf16 weights: a reference run keeps its
    precision)."""
    if choice == "fp32":
        return torch.float32
    if choice == "fp16":
        return torch.float16
    if choice != "auto":
        raise ValueError(f"unknown KV cache dtype {choice!r}: auto, fp16 or fp32")
    from blink.models.quant import quantized

    return torch.float16 if model.dtype == torch.float32 and quantized(model) else model.dtype


class Interrupt(threading.Event):
    """`ModelRunner.interrupt`: an Event whose state native code sees too, as one byte it polls between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.byte = ctypes.c_uint8(0)

    def set(self) -> None:
        self.byte.value = 1
        super().set()

    def clear(self) -> None:
        self.byte.value = 0
        super().clear()


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        *,
        num_blocks: int,
        block_size: int,
        native_kernels: bool = True,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`kv_dtype`: the KV cache's (kv_cache_dtype; default: the model's dtype)."""
        self.model = model
        self.dtype = model.dtype if kv_dtype is None else kv_dtype
        # decode attention in the C kernel: fp32 activations (every format but bf16), an fp32 or fp16 cache
        self.native = (
            native_kernels and native.available() and model.dtype == torch.float32 and self.dtype in native.KV_DTYPES
        )
        self.kv = PagedKVCache(model, num_blocks, block_size, self.dtype)
        self.block_size = block_size
        self._offsets = torch.arange(block_size)
        self._generators: dict[str, torch.Generator | None] = {}
        # set from any thread to call off the step running (if it is interruptible and not too far along)
        self.interrupt = Interrupt()
        self._cut = (3 * model.config.num_hidden_layers) // 4  # past it, finishing costs less than a redo
        cfg = model.config
        self.windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)] if cfg.sliding_window else None
        # decode-only steps in one native call, where the model allows it (fused_decode.py)
        self.fused = FusedDecoder.for_model(model, self.kv) if self.native else None

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
        chunks: list[Chunk] = []
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
            # prompt tokens through the prompt path, output tokens through the decode path, each as it was first
            # computed: a one-token prompt chunk (a pre-load, or a chunk shrunk by the budget) would otherwise join
            # the decoders' attention call and change its numerics (measured: a live stream's greedy tokens changed
            # when a pre-load's chunk shared its step); and output tokens computed again after a preemption (a
            # chunk past the prompt) get decode rows, bit for bit the K/V they had, so what follows is what it
            # would have been (as prompt rows their K/V differed in the last bits, enough to change greedy tokens
            # with an fp16 cache)
            split = min(max(len(seq.prompt_token_ids), start), start + n)  # this chunk's first output position
            if split > start:  # prompt rows; their keys: up to the end of their last block (see PagedAttention)
                keys_end = -(-split // self.block_size) * self.block_size
                used = table[: keys_end // self.block_size]
                one_run = all(b == used[0] + i for i, b in enumerate(used))
                span = slice(used[0] * self.block_size, used[0] * self.block_size + keys_end) if one_run else None
                chunks.append(Chunk(slice(row, row + split - start), start, self._context(table, keys_end), span))
            if split < start + n:  # output rows
                decode_starts.append(split)
                decode_rows.append(slice(row + split - start, row + n))
                decode_context.append(self._context(table, start + n))
            if start + n >= seq.num_tokens and not seq.prefill_only:
                first = len(sample_rows)
                sample_rows.extend(range(row + n - 1 - len(extra), row + n))
                where.append(slice(first, len(sample_rows)))
            else:
                where.append(None)
        decode: DecodeRows | NativeDecodeRows | None = None
        if decode_rows and self.native:
            decode = NativeDecodeRows(decode_starts, decode_rows, decode_context)
        elif decode_rows:
            heads = self.model.config.num_attention_heads
            decode = DecodeRows(self.kv, decode_starts, decode_rows, decode_context, heads)
        step = (torch.tensor(ids), torch.tensor(positions), torch.tensor(slot_mapping))
        logits_index = torch.tensor(sample_rows, dtype=torch.long)
        if self.fused is not None and not chunks and isinstance(decode, NativeDecodeRows):
            interrupt = self.interrupt.byte if interruptible else None
            return self.fused.forward(*step, decode, logits_index, interrupt, self._cut), where
        backend = PagedAttention(self.kv, step[2], chunks, decode, self._stop if interruptible else None, self.windows)
        return self.model(step[0], step[1], backend, logits_index), where

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
                logits.index_select(0, rows),
                [s.params for s in seqs],
                [self._generators[s.request_id] for s in seqs],
                [len(s.output_token_ids) for s in seqs],
            )
            for i, token in zip(plain, picked, strict=True):
                out[i] = [token]
        if proposals:
            for i, proposal in enumerate(proposals):
                w = where[i]
                if proposal and proposal.tokens and w is not None:
                    seq = batch.sequences[i]
                    gen = self._generators[seq.request_id]
                    out[i] = verify(logits[w], proposal, seq.params, gen, len(seq.output_token_ids))
        return out
