"""Weight formats for the model's linear layers: fp32 (as loaded), bf16, or int8.

int8: each output channel's weights are scaled to int8 (symmetric, per channel); activations are scaled to int8
per token on the fly, and the product accumulates exactly in int32. A decode step reads a quarter of fp32's
weight bytes: on CPU, decode is bound by those bytes. Embeddings stay in fp32 (a lookup reads one row); a tied
lm_head gets its own int8 copy.
"""

from __future__ import annotations

import torch
from torch import nn

from blink.config import WEIGHT_FORMATS


class Int8Linear(nn.Module):
    """y = x W^T with W int8 per output channel and x quantized to int8 per row (token) on the fly.

    The product accumulates exactly in int32 (`torch._int_mm`), and every scale is per row or per column, so a
    token's output does not depend on which other tokens share the batch: a prompt chunk, a decode step and a
    verification pass of speculative decoding give the same numbers for the same token. (fbgemm's dynamic
    linear measured faster at batch 8, but it scales activations per tensor, so a token's result changed with
    its batch and a prefix-cache hit could change greedy output.)"""

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [N]
        quantized = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)  # [N, K]
        self.register_buffer("weight_t", quantized.t())  # [K, N] column-major: the layout _int_mm reads fastest
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row_scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8).div_(127.0)  # [M, 1]
        xq = torch.round(x / row_scale).to(torch.int8)
        out = torch._int_mm(xq, self.weight_t).to(x.dtype)  # [M, N], exact int32 sums
        out.mul_(row_scale).mul_(self.weight_scale)
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def convert(model: nn.Module, weights: str) -> nn.Module:
    """Put `model`'s weights in format `weights` (one of WEIGHT_FORMATS), in place; returns the model."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weights == "bf16":
        keep = {name: buf for name, buf in model.named_buffers() if name.startswith("rope_")}
        model.to(torch.bfloat16)
        for name, buf in keep.items():  # rotary tables stay fp32: bf16 angles drift at long positions
            setattr(model, name, buf)
        return model
    if weights == "int8":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model
