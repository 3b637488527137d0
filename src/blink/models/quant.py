"""Weight formats for the model's linear layers: fp32 (as loaded), bf16, or int8.

int8: each output channel's weights are scaled to int8 (symmetric, per channel) and packed for fbgemm, which
multiplies with the activations quantized per tensor on the fly (dynamic quantization) and accumulates in int32.
A decode step reads a quarter of fp32's weight bytes: on CPU, decode is bound by those bytes. Embeddings stay in
fp32 (a lookup reads one row); a tied lm_head gets its own int8 copy.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from blink.config import WEIGHT_FORMATS


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        bias = linear.bias.detach().float() if linear.bias is not None else None
        with warnings.catch_warnings():  # torch flags the quantized-tensor constructors as deprecated
            warnings.simplefilter("ignore")
            zero = torch.zeros_like(scale, dtype=torch.long)
            qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)  # type: ignore[no-any-return]

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
        engines = torch.backends.quantized.supported_engines
        if "fbgemm" not in engines and "x86" not in engines:
            raise ValueError("int8 weights need torch's fbgemm (x86) backend; use --weights fp32")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model
