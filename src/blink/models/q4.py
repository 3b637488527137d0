"""q4: the 4-bit linear layer (Q4Linear, weights in blink's C kernel, models/_q4.c) and the fusion of a Llama-shaped
layer's norms, SwiGLU and residual adds into its q4 projections (fuse_layers). quant.py converts models into it."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from blink.models import native
from blink.models.llama import MLP, Attention, DecoderLayer, LlamaModel, RMSNorm


class Q4Linear(nn.Module):
    """q4: y = x W^T with W 4-bit in blocks of 32 inputs (d * q + m, q in 0..15, llama.cpp's Q4_1) and x int8 in
    blocks of 32 (its Q8_1), in blink's C kernel (models/_q4.c): 5 bits a weight, 0.6 of w8a8's bytes. Each
    (row, channel) is summed in the same order whatever the batch: batch-invariant as the int8 formats."""

    weight_packed: torch.Tensor
    bias: torch.Tensor | None
    norm: torch.Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        *,
        level: int | None = None,
        blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`blocks`: (q, d, m) the weights already are in (a GGUF's own 4-bit blocks, Converter), used as they are
        instead of quantizing the fp32 weights."""
        super().__init__()
        self.level = native.q4_best_level() if level is None else level
        if self.level < 0:
            raise ValueError("--weights q4 needs blink's C kernel, which this install did not build")
        q, d, m = blocks if blocks is not None else native.q4_quantize(linear.weight.detach())
        self.register_buffer("weight_packed", native.q4_pack(q, d.half(), m.half()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.prologue, self.eps = native.Q4_PLAIN, 0.0
        self.register_buffer("norm", None)

    def absorb_norm(self, norm: nn.Module) -> None:
        """Take over the RMSNorm `norm` (weight, eps) that runs before this layer: its input is then the raw x."""
        self.prologue, self.eps = native.Q4_RMSNORM, float(norm.eps)  # type: ignore[arg-type]
        self.norm = norm.weight.detach().float().contiguous().clone()  # type: ignore[operator]

    def absorb_swiglu(self) -> None:
        """Take silu(gate) * up over its input [M, 2K] (a fused gate/up projection's output) itself."""
        self.prologue = native.Q4_SWIGLU

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return native.q4_linear(
            x,
            self.weight_packed,
            self.bias,
            self.out_features,
            self.level,
            prologue=self.prologue,
            norm=self.norm,
            eps=self.eps,
            residual=residual,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q4 ({native.Q4_LEVELS[self.level]})"


def fuse_layers(model: LlamaModel) -> int:
    """Let the q4 kernel run each plain Llama-shaped layer's norms, SwiGLU and residual adds (DecoderLayer.fused):
    qkv_proj and gate_up_proj take over the RMSNorm before them, down_proj the SwiGLU, o_proj and down_proj add
    the residual. Layers of another shape (a family's own forward, norms or activation) stay as they are. Returns
    how many layers were fused."""
    fused = 0
    for layer in cast(list[DecoderLayer], list(model.layers)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        plain = (
            type(layer).forward is DecoderLayer.forward
            and type(attn).forward is Attention.forward
            and type(mlp).forward is MLP.forward
            and type(mlp).act is MLP.act
            and type(layer.input_layernorm) is RMSNorm
            and type(layer.post_attention_layernorm) is RMSNorm
        )
        projections = [p for p in (qkv, o, gate_up, down) if isinstance(p, Q4Linear) and p.prologue == native.Q4_PLAIN]
        if not plain or len(projections) < 4:
            continue
        cast(Q4Linear, qkv).absorb_norm(layer.input_layernorm)
        cast(Q4Linear, gate_up).absorb_norm(layer.post_attention_layernorm)
        cast(Q4Linear, down).absorb_swiglu()
        layer.input_layernorm = layer.post_attention_layernorm = nn.Identity()  # type: ignore[assignment]
        layer.fused = True
        fused += 1
    return fused
