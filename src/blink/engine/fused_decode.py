"""A decode-only step of a fused q4 model in one native call (models/_decode.c): every layer's norms, q4
projections, rotary, KV write, attention, SwiGLU and residual adds, with no Python between them.

Why: at batch 1 the 135M model's step spent ~6 of its ~13 ms in the Python and small torch ops around its 150
kernel calls (30 layers x 4 q4 projections and the attention), more than llama-server's whole step. The native
step runs the same kernels with the same float operations in the same order, so its logits are bit for bit the
module path's (tested), and so every guarantee built on them holds (batch invariance, speculative decoding's
identity with plain decoding).

When: the model's layers are all fused (q4.fuse_layers: q4 weights, Llama's layer), the family computes
Llama's attention as it is (no q/k norms, one rotary table, no sliding window), the KV cache is fp32 or fp16 and
the C kernels are built, and the step holds decode rows only (one per decoding sequence, or 1 + k when it verifies
guesses); any other step runs the modules (runner.py).
"""

from __future__ import annotations

import ctypes
from typing import cast

import torch

from blink.engine.attention import NativeDecodeRows, PagedKVCache, StepInterrupted
from blink.models import native
from blink.models.llama import Attention, DecoderLayer, LlamaModel
from blink.models.q4 import Q4Linear

# one row of pointers per layer, in _decode.c's order
FIELDS = ("qkv_w", "qkv_b", "norm1", "o_w", "o_b", "gu_w", "gu_b", "norm2", "down_w", "down_b", "kc", "vc")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class FusedDecoder:
    """Runs decode-only steps of one model over one KV cache (see the module docstring). Build with `for_model`,
    which returns None where the native step does not apply."""

    def __init__(self, model: LlamaModel, kv: PagedKVCache, projections: list[tuple[Q4Linear, ...]]) -> None:
        cfg = model.config
        self.model = model
        self.hidden, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.dim, self.inter, self.layers = cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers
        self.level = projections[0][0].level
        self.eps = projections[0][0].eps
        rows = []
        for (qkv, o, gu, down), kc, vc in zip(projections, kv.k, kv.v, strict=True):
            tensors = {
                **{"qkv_w": qkv.weight_packed, "qkv_b": qkv.bias, "norm1": qkv.norm, "o_w": o.weight_packed},
                **{"o_b": o.bias, "gu_w": gu.weight_packed, "gu_b": gu.bias, "norm2": gu.norm},
                **{"down_w": down.weight_packed, "down_b": down.bias, "kc": kc, "vc": vc},
            }
            rows.append([_ptr(tensors[field]) for field in FIELDS])
        # the table holds raw pointers: the tensors it names are the model's buffers and the cache's, which live as
        # long as the runner that holds this
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.cos, self.sin = model.rope_cos.contiguous(), model.rope_sin.contiguous()
        self.half = kv.k[0].dtype == torch.float16

    @staticmethod
    def for_model(model: LlamaModel, kv: PagedKVCache) -> FusedDecoder | None:
        cfg = model.config
        if not native.available() or native.q4_best_level() < 0 or cfg.sliding_window is not None:
            return None
        family = type(model)
        if (
            family.forward is not LlamaModel.forward
            or family.rotary is not LlamaModel.rotary
            or family.rope_for_layer is not LlamaModel.rope_for_layer
            or model.rope_cos.dtype != torch.float32
            or cfg.head_dim > 256
            or cfg.head_dim % 2
        ):
            return None
        kv_dtype = kv.k[0].dtype
        if kv_dtype not in native.KV_DTYPES or any(
            t.dtype != kv_dtype or not t.is_contiguous() for t in (*kv.k, *kv.v)
        ):
            return None
        projections: list[tuple[Q4Linear, ...]] = []
        for layer in cast(list[DecoderLayer], list(model.layers)):
            attn, mlp = layer.self_attn, layer.mlp
            parts = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not (
                layer.fused
                and type(attn).forward is Attention.forward
                and type(attn).norm_qk is Attention.norm_qk
                and all(isinstance(p, Q4Linear) for p in parts)
            ):
                return None
            projections.append(cast(tuple[Q4Linear, ...], parts))
        first = projections[0][0]
        expected = (native.Q4_RMSNORM, native.Q4_PLAIN, native.Q4_RMSNORM, native.Q4_SWIGLU)
        widths = (
            (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
            cfg.hidden_size,
            2 * cfg.intermediate_size,
            cfg.hidden_size,
        )
        for q4 in projections:
            if any(p.level != first.level for p in q4) or q4[0].eps != first.eps or q4[2].eps != first.eps:
                return None
            if tuple(p.prologue for p in q4) != expected or tuple(p.out_features for p in q4) != widths:
                return None
        return FusedDecoder(model, kv, projections)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        decode: NativeDecodeRows,
        logits_index: torch.Tensor,
        interrupt: ctypes.c_uint8 | None = None,
        cut: int = 0,
    ) -> torch.Tensor:
        """As LlamaModel.forward for a step whose every row is a decode row (`decode` covers them all): logits
        [M, V] for the rows in `logits_index`. With `interrupt`, a byte set from another thread, the step stops
        before a layer below `cut` (StepInterrupted)."""
        if int(positions.max()) >= self.cos.shape[0]:
            raise IndexError(f"position {int(positions.max())} is past the rotary tables ({self.cos.shape[0]})")
        model = self.model
        x = model.embed(input_ids).float().contiguous()  # [M, C], updated in place layer by layer
        done = native.decode_layers(
            x,
            self.heads,
            self.kv_heads,
            self.dim,
            self.inter,
            self.table,
            self.eps,
            self.cos,
            self.sin,
            positions,
            slot_mapping,
            decode,
            self.level,
            0 if interrupt is None else ctypes.addressof(interrupt),
            cut,
            self.half,
        )
        if done < self.layers:
            raise StepInterrupted
        logits: torch.Tensor = model.lm_head(model.norm(x[logits_index])).float()
        return logits
