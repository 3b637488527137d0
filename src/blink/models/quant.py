"""Weight formats for the model's linear layers: fp32 (as loaded), bf16, int8 (weight-only) or w8a8.

Both int8 formats scale each output channel's weights to int8 (symmetric, per channel): a decode step reads a
quarter of fp32's weight bytes, and on CPU decode is bound by those bytes. Embeddings stay in fp32 (a lookup reads
one row); a tied lm_head gets its own int8 copy. Measured side by side in benchmarks/results/engine.md:

  int8   weight-only: activations stay in bf16 and torch's int8 GEMV kernel (`_weight_int8pack_mm`) dequantizes
         on the fly. Closest to fp32 (greedy agreement 96%); but the kernel does one row at a time, so a prompt
         prefills about 2x slower than fp32.
  w8a8   int8 weights and int8 activations (per token, on the fly), exact int32 accumulation: in blink's C kernel
         (models/native.py) where it is built, else `torch._int_mm`, with the same results. The default: the
         fastest decode and prefill (with the kernel: 1.3x int8's decode, 1.9x fp32's prefill), greedy agreement
         93%.

Activation outliers (a few channels far larger than the rest) make per-token int8 coarse, so w8a8 is smoothed as
in SmoothQuant: a short built-in calibration text goes through the fp32 model once at load; each linear layer
gets per-input-channel factors s = max|x|^0.5 / max|w|^0.5, its weights are multiplied by s before quantizing and
its input divided by s at run time (x W^T = (x / s)(W s)^T), which moves the outliers' range into the weights.
Measured: greedy agreement with fp32 88.9% without smoothing, 94.1% with.

Both int8 formats are batch-invariant: a token's output does not depend on which other tokens share its step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from blink.config import WEIGHT_FORMATS
from blink.models import native
from blink.models.llama import CausalAttention, LlamaConfig, LlamaModel
from blink.models.q4 import Q4Linear, fuse_layers


class Int8WeightOnly(nn.Module):
    """y = x W^T with W int8 per output channel, x in bf16; the kernel computes each row (token) on its own."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [N]
        quantized = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.contiguous())  # [N, K]: the layout _weight_int8pack_mm reads
        self.register_buffer("weight_scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 activations: the kernel's fp32 path is not vectorized (measured 10x slower than bf16)
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.weight_scale).float()
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


QUANTIZE_ROWS = 4096  # output channels quantized at a time (Int8Linear)


class Int8Linear(nn.Module):
    """w8a8: y = x W^T with W int8 per output channel and x quantized to int8 per row (token) on the fly.

    The product accumulates exactly in int32 (the C kernel, or `torch._int_mm` with `level=-1` or without the
    kernel: bit for bit the same), and every scale is per row or per column, so a
    token's output does not depend on which other tokens share the batch: a prompt chunk, a decode step and a
    verification pass of speculative decoding give the same numbers for the same token. (fbgemm's dynamic
    linear measured faster at batch 8, but it scales activations per tensor, so a token's result changed with
    its batch and a prefix-cache hit could change greedy output.)"""

    weight_t: torch.Tensor
    weight_packed: torch.Tensor
    weight_sum: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    smooth: torch.Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        input_absmax: torch.Tensor | None = None,
        alpha: float = 0.5,
        *,
        level: int | None = None,
    ) -> None:
        super().__init__()
        weight = linear.weight.detach()
        n, k = weight.shape
        smooth = factor = None
        # row by row in chunks: every operation is per row (or a max over rows), so the numbers are the whole
        # matrix's, and a large layer (a 49k-token lm_head: 113 MB in fp32) never has four fp32 temporaries at once
        chunks = [slice(i, min(i + QUANTIZE_ROWS, n)) for i in range(0, n, QUANTIZE_ROWS)]
        if input_absmax is not None:  # SmoothQuant: x W^T = (x / s)(W s)^T
            w_absmax = torch.zeros(k)
            for rows in chunks:
                w_absmax = torch.maximum(w_absmax, weight[rows].float().abs().amax(dim=0))
            w_absmax = w_absmax.clamp(min=1e-5)  # [K]
            factor = (input_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)).clamp(min=1e-5)
            smooth = 1.0 / factor
        scale = torch.empty(n)  # [N]
        quantized = torch.empty(n, k, dtype=torch.int8)  # [N, K]
        for rows in chunks:
            w = weight[rows].float() if factor is None else weight[rows].float() * factor.unsqueeze(0)
            scale[rows] = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            quantized[rows] = torch.round(w / scale[rows].unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        # the C kernel's instruction level (None: the best this CPU has), -1: torch ops
        self.level = native.best_level() if level is None else level
        if self.level >= 0:  # the C kernel's blocked layout (and the sums its unsigned activations add)
            packed, wsum = native.pack(quantized)
            self.register_buffer("weight_packed", packed)
            self.register_buffer("weight_sum", wsum)
        # [K, N] column-major, the layout _int_mm reads fastest: for the sizes the kernel does not take (all of
        # them without it; from a few rows up with AVX2 only, at the price of a second copy of the weights)
        needed = self.level < 0 or not native.serves_every_size(self.level)
        self.register_buffer("weight_t", quantized.t() if needed else None)
        self.register_buffer("weight_scale", scale / 127.0)
        self.register_buffer("smooth", smooth)  # folds the activations' 1/127 in
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level >= 0 and native.fast_for(x.shape[0], self.level):
            w, wsum, scale, n = self.weight_packed, self.weight_sum, self.weight_scale, self.out_features
            return native.linear(x, w, wsum, scale, self.smooth, self.bias, n, self.level)
        return self._torch(x, self.weight_t)

    def _torch(self, x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """The same product in torch ops (weights [K, N], column-major)."""
        if self.smooth is not None:
            x = x * self.smooth
        # abs().amax(): linalg.vector_norm(inf) gives the same values but measured 5-10x slower from 8 rows up
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-6)  # [M, 1]
        xq = torch.round(x * (127.0 / amax)).to(torch.int8)
        scale = amax * self.weight_scale  # [M, N]: the row's and the column's scale (weight_scale has the 1/127)
        out: torch.Tensor = torch._int_mm(xq, weight_t) * scale  # exact int32 sums, one multiply to float
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


# calibration for w8a8 smoothing: prose, code and a chat turn, as the model will see them
CALIBRATION_TEXT = (
    "In the morning the baker opened the shop and set out bread, rolls and cakes. Customers came in from the "
    "street, asked about prices, and talked about the weather, the news and their families. "
    "The committee met on Tuesday to discuss the budget for the new library; after a long debate, it agreed to "
    "fund two more reading rooms and a small cafe.\n"
    "def mean(values):\n    return sum(values) / len(values)\n\nprint(mean([2, 3, 7]))\n"
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n"
    "<|im_start|>assistant\nMount Everest, at 8,849 metres above sea level.<|im_end|>\n"
)


class HalfEmbedding(nn.Module):
    """Token embeddings kept in fp16, looked up as fp32: a lookup reads one row per token, so half of fp32's
    memory costs nothing in speed (Qwen2.5-1.5B's untied table: 0.9 GB -> 0.45 GB). The quantized formats'
    (their lm_head has its own copy)."""

    weight16: torch.Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.register_buffer("weight16", embedding.weight.detach().to(torch.float16).contiguous())
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight16).float()


# GGUF weight types whose blocks q4 keeps as they are (Q4_1 exactly; Q4_0's are Q4_1 blocks with m = -8 d; Q4_K's
# eight blocks of 32 per super-block with their scale products rounded to fp16): GGUFModel.q4_blocks
Q4_BLOCKS = ("Q4_0", "Q4_1", "Q4_K")


def quantized(model: nn.Module) -> bool:
    """Whether any linear layer of `model` has int8 or 4-bit weights (its activations stay fp32)."""
    return any(isinstance(m, (Int8Linear, Int8WeightOnly, Q4Linear)) for m in model.modules())


def choose(weights: str, source_types: dict[str, int], *, native_kernels: bool = True) -> str:
    """--weights, with `auto` resolved for a model whose weight tensors have these GGML types (count per type;
    empty for safetensors): q4 when most of them are blocks q4 keeps as they are and its kernel runs here, else
    w8a8. Measured (benchmarks/results/perplexity*.md, against llama-perplexity on the same GGUF): SmolLM2 Q4_1
    in q4 +0.8% (w8a8 +2.9%); Qwen2.5-Coder-1.5B Q4_K_M in q4 from its own blocks +1.0% (re-quantized from
    their fp32 values it was +2.4%), in w8a8 +2.0%. 8- and 16-bit sources take w8a8."""
    if weights != "auto":
        return weights
    quantized = {t: n for t, n in source_types.items() if t not in ("F32", "F16", "BF16")}
    most = max(quantized, key=lambda t: quantized[t], default="")
    if most in Q4_BLOCKS and native_kernels and native.q4_best_level() >= 0:
        return "q4"
    return "w8a8"


class Converter:
    """Puts a model's weights in format `weights` (one of WEIGHT_FORMATS) piece by piece, as loader.load fills
    the model: `start` once the embeddings are in, `layer(model, i)` as each layer's fp32 weights arrive (they are
    freed once converted), `finish` for lm_head and the embeddings. For w8a8, `calibration_ids` (the tokens of
    CALIBRATION_TEXT) enable smoothing: they go through each fp32 layer before it is converted, recording every
    linear layer's per-input-channel max |x|: the activations of one whole fp32 forward, so converting while
    loading gives the same numbers as converting a loaded model (`convert`). Without them w8a8 is plain
    per-channel; with `native_kernels` (and the C kernel built) its layers run in the kernel: the same numbers,
    faster."""

    def __init__(
        self,
        weights: str,
        calibration_ids: list[int] | None = None,
        *,
        native_kernels: bool = True,
        blocks: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None,
    ) -> None:
        """`blocks`: for q4, a checkpoint weight's own 4-bit blocks by its name ("model.layers.0.mlp.up_proj.weight"),
        or None where it has none (GGUFModel.q4_blocks): a GGUF's Q4_0/Q4_1/Q4_K weights are then kept as they
        are, not quantized again from their fp32 values."""
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if weights == "q4" and not (native_kernels and native.q4_best_level() >= 0):
            raise ValueError("--weights q4 runs only in blink's C kernel: drop --no-native-kernels, or build it")
        self.weights, self.native_kernels, self.blocks = weights, native_kernels, blocks
        self.calibration_ids = calibration_ids if weights not in ("int8", "fp32", "bf16") else None
        self._x: torch.Tensor | None = None  # the calibration tokens' hidden states before the next layer
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, model: LlamaModel) -> None:
        if self.calibration_ids:
            ids = self.calibration_ids[: model.positions]  # the rotary tables cover the engine's context only
            with torch.inference_mode():
                self._x = model.embed(torch.tensor(ids))
                self._tables = model.rotary(torch.arange(len(ids)), self._x.dtype)

    def layer(self, model: LlamaModel, index: int) -> None:
        layer = model.layers[index]
        absmax: dict[str, torch.Tensor] = {}
        if self._x is not None:
            hooks = [_record_absmax(module, name, absmax) for name, module in layer.named_modules()]
            try:
                cos, sin = self._tables[model.rope_for_layer(index)]
                with torch.inference_mode():
                    self._x = layer(self._x, cos, sin, CausalAttention(model.config))
            finally:
                for hook in hooks:
                    if hook is not None:
                        hook.remove()
        if self.weights in ("int8", "w8a8", "q4"):
            self._convert_linears(layer, absmax, index=index, config=model.config)

    def finish(self, model: LlamaModel) -> None:
        if self.weights == "bf16":
            keep = {name: buf for name, buf in model.named_buffers() if name.startswith("rope_")}
            model.to(torch.bfloat16)
            for name, buf in keep.items():  # rotary tables stay fp32: bf16 angles drift at long positions
                setattr(model, name, buf)
            return
        if self.weights not in ("int8", "w8a8", "q4"):
            return
        absmax = {}
        if self._x is not None:  # lm_head reads the final norm of every calibration token
            with torch.inference_mode():
                absmax["lm_head"] = model.norm(self._x).abs().amax(dim=0)
            self._x = None
        self._convert_linears(model, absmax, skip="layers.")
        if self.weights == "q4":
            fuse_layers(model)
        if isinstance(getattr(model, "embed_tokens", None), nn.Embedding):
            model.embed_tokens = HalfEmbedding(model.embed_tokens)  # type: ignore[assignment]

    def _convert_linears(
        self,
        root: nn.Module,
        absmax: dict[str, torch.Tensor],
        skip: str | None = None,
        *,
        index: int | None = None,
        config: LlamaConfig | None = None,
    ) -> None:
        """Replace every nn.Linear under `root` (but those under `skip`) by its converted form; `index`: the
        layer `root` is (where its weights' own blocks are looked up)."""
        for parent_name, parent in list(root.named_modules()):
            if skip and parent_name.startswith(skip):
                continue
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    full = f"{parent_name}.{name}" if parent_name else name
                    if self.weights == "int8":
                        quantized: nn.Module = Int8WeightOnly(child)
                    elif self.weights == "q4" and full != "lm_head" and child.in_features % native.Q4_GROUP == 0:
                        own = self._own_blocks(child, full, index, config) if index is not None else None
                        quantized = Q4Linear(child, blocks=own)
                    else:
                        level = None if self.native_kernels else -1
                        quantized = Int8Linear(child, absmax.get(full), level=level)
                    setattr(parent, name, quantized)

    def _own_blocks(
        self, linear: nn.Linear, name: str, index: int, config: LlamaConfig | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Layer `index`'s linear `name` as q4 blocks, taking the checkpoint's own 4-bit blocks where it has them
        (a fused projection part by part: q, k, v or gate, up; the parts without, such as a Q4_K_M file's Q6_K
        ones, quantized from their fp32 rows). None where no part has its own blocks. Each part's blocks are
        checked against its fp32 weights: a mismatch (a mapping gone wrong) raises."""
        if self.blocks is None or config is None:
            return None
        heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        inter = config.intermediate_size
        parts = {
            "self_attn.qkv_proj": (
                ("self_attn.q_proj", heads * dim),
                ("self_attn.k_proj", kv * dim),
                ("self_attn.v_proj", kv * dim),
            ),
            "mlp.gate_up_proj": (("mlp.gate_proj", inter), ("mlp.up_proj", inter)),
        }.get(name, ((name, linear.out_features),))
        prefix = f"model.layers.{index}."
        found = [self.blocks(prefix + part + ".weight") for part, _ in parts]
        if all(f is None for f in found) and name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            found = [self.blocks(prefix + name + ".weight")]  # a checkpoint that stores it fused (Phi-3)
            parts = ((name, linear.out_features),)
        if all(f is None for f in found):
            return None
        weight = linear.weight.detach()
        pieces, row = [], 0
        for (part, rows), own in zip(parts, found, strict=True):
            mine = weight[row : row + rows]
            if own is None:  # quantized from its values, as without blocks
                q, d, m = native.q4_quantize(mine)
                pieces.append((q, d.float(), m.float()))
            else:
                oq, od, om = (torch.from_numpy(np.ascontiguousarray(a)) for a in own)
                if oq.shape != mine.shape:
                    raise ValueError(f"{prefix}{part}: 4-bit blocks of {tuple(oq.shape)} for {rows} rows")
                values = oq.float().view(rows, -1, native.Q4_GROUP) * od.unsqueeze(-1) + om.unsqueeze(-1)
                if not torch.equal(values.view(rows, -1), mine.float()):
                    raise ValueError(f"{prefix}{part}: its 4-bit blocks do not give its weights")
                pieces.append((oq, od, om))
            row += rows
        q, d, m = (torch.cat(column) for column in zip(*pieces, strict=True))
        return q, d, m


def _record_absmax(module: nn.Module, name: str, seen: dict[str, torch.Tensor]) -> RemovableHandle | None:
    """A hook recording a linear layer's per-input-channel max |x| into seen[name] (None for other modules)."""
    if not isinstance(module, nn.Linear):
        return None

    def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
        absmax = inputs[0].detach().abs().amax(dim=0)
        seen[name] = torch.maximum(seen[name], absmax) if name in seen else absmax

    return module.register_forward_hook(record)


def convert(
    model: LlamaModel, weights: str, calibration_ids: list[int] | None = None, *, native_kernels: bool = True
) -> LlamaModel:
    """Put a loaded model's weights in format `weights`, in place (see Converter, which loader.load also takes
    to convert while loading); returns the model."""
    converter = Converter(weights, calibration_ids, native_kernels=native_kernels)
    converter.start(model)
    for i in range(len(getattr(model, "layers", ()))):  # any module converts (its linear layers in `finish`)
        converter.layer(model, i)
    converter.finish(model)
    return model
