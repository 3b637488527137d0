"""The Llama family (Llama 2/3, SmolLM, Mistral; Qwen2 adds biases on q/k/v) as one readable PyTorch module, and
the decoder the other families (qwen3.py, gemma3.py, phi3.py) build on by swapping a part.

The model knows nothing of KV caches or batching: tokens of all sequences in a step come flattened as [N],
and each attention layer hands its q/k/v to an `AttentionBackend` supplied by the runner, which stores k/v
wherever the engine keeps them and returns the attention output (scaled by 1/sqrt(head_dim): a family with
another scale folds it into its queries).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from blink.models import rope


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    architecture: str = "llama"  # the family (families.py)
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_freq_factors: list[float] | None = None  # a GGUF's Llama 3 scaling (rope_freqs.weight)
    # gemma3: the rope of the sliding-window layers, the layers' kinds, the window and the query scale
    rope_local: dict[str, Any] | None = None
    layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    norms_offset_folded: bool = False  # gemma3: the norms' weights already hold their + 1 (a GGUF's do)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (a position sees its last `window` positions, itself included), or None
        for full attention: every layer's when the config names no kinds (Mistral v0.1, Phi-3 mini), the
        "sliding_attention" layers' otherwise (Gemma 3)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, D], k/v [N, KVH, D] for this step's tokens -> attention output [N, H, D]."""
        ...


class CausalAttention:
    """The simplest backend: one sequence read whole, no cache (calibration, tests, reference checks). With a
    config, its layers' sliding windows apply."""

    def __init__(self, config: LlamaConfig | None = None) -> None:
        self.config = config

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        window = self.config.window(layer) if self.config is not None else None
        n = q.shape[0]
        mask = None
        if window is not None and window < n:
            at = torch.arange(n)
            mask = (at.unsqueeze(0) <= at.unsqueeze(1)) & (at.unsqueeze(0) > at.unsqueeze(1) - window)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, N, D]
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # [N, H, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # five small kernels: at batch 1 F.rms_norm's generic path measured ~4x slower per call
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's halves. The model itself uses `rope_sin_signed` and a roll,
    which is the same product in fewer kernels: rotate_half(x) * sin == roll(x, D/2) * (-sin1, sin2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """q, k and v come from one fused projection (one weight read, one kernel call per step)."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`residual`: added to the output by o_proj itself (a fused layer's, see DecoderLayer.fused)."""
        n, h, kv = x.shape[0], self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(n, h + 2 * kv, self.head_dim)  # [N, H + 2 KVH, D]
        qk = self.norm_qk(qkv[:, : h + kv])
        qk = qk * cos + qk.roll(self.head_dim // 2, -1) * sin  # rotary on q and k at once (sin signed, see rotate_half)
        out = backend.attend(self.layer, qk[:, :h], qk[:, h:], qkv[:, h + kv :])  # [N, H, D]
        if residual is not None:
            return self.o_proj(out.reshape(n, h * self.head_dim), residual)
        return self.o_proj(out.reshape(n, h * self.head_dim))

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """q and k [N, H + KVH, D] before the rotary embedding (a family with q/k norms normalises them here)."""
        return qk


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`residual`: a fused layer's (see DecoderLayer.fused): its projections norm the input, gate and add."""
        if residual is not None:
            return self.down_proj(self.gate_up_proj(x), residual)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    @staticmethod
    def act(gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)


class DecoderLayer(nn.Module):
    attention: ClassVar[type[Attention]] = Attention
    mlp_type: ClassVar[type[MLP]] = MLP

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self.attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.mlp_type(cfg)

    # True once the q4 kernel took over this layer's norms, SwiGLU and residual adds (q4.fuse_layers): the
    # layer is then four native calls and the attention between them
    fused = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        if self.fused:
            x = self.self_attn(x, cos, sin, backend, residual=x)
            return self.mlp(x, residual=x)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """A decoder-only transformer. A family changes a part by subclassing: `layer_type` (its attention, MLP or
    norms), `embed_scale`, `fold_checkpoint` (weights whose stored form differs from what the modules compute
    with), `rope_for_layer` (layers with their own rotary table)."""

    layer_type: ClassVar[type[DecoderLayer]] = DecoderLayer
    rope_cos: torch.Tensor  # [positions, D]
    rope_sin: torch.Tensor  # signed: first half negated (see rotate_half)

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_type(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.positions = cfg.context_length  # rows of the rotary tables (the loader sizes them to the engine's)
        self.init_rope()

    def init_rope(self, positions: int | None = None) -> None:
        """(Re)compute the rotary tables in fp32 on the CPU for positions [0, positions) (default: as before; after
        a model built on the meta device is loaded, or to size them to the engine's context)."""
        self.positions = positions or self.positions
        self.rope_cos, self.rope_sin = self.rope_tables(self.config.rope, self.config.rope_freq_factors)

    def rope_tables(
        self, params: dict[str, Any], freq_factors: list[float] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        with torch.device("cpu"):
            inv_freq, scale = rope.inverse_frequencies(
                cfg.head_dim, params, context=self.positions, freq_factors=freq_factors
            )
            angles = torch.outer(torch.arange(self.positions, dtype=torch.float32), inv_freq)  # [P, D/2]
            angles = torch.cat((angles, angles), dim=-1)  # [P, D]
            half = cfg.head_dim // 2
            sin = torch.cat((-angles[:, :half].sin(), angles[:, half:].sin()), dim=-1)  # [P, D]
            return angles.cos() * scale, sin * scale

    def load_checkpoint(self, state: dict[str, torch.Tensor], *, part: str | None = None) -> None:
        """Load Hugging Face-named weights ("model.layers.0.self_attn.q_proj.weight", ...), fusing q/k/v and
        gate/up into one projection each (a checkpoint may hold them fused already, as Phi-3's); strict. Takes the
        tensors out of `state` (left empty): a part fused away is freed at once, so loading never holds a layer's
        weights twice. `part` loads a piece of the model, strict within it (loader.load, layer by layer):
        "layers.<i>." one layer, "rest" everything outside the layers."""
        renamed = {k.removeprefix("model."): v for k, v in state.items()}
        state.clear()
        for i in range(self.config.num_hidden_layers):
            prefix = f"layers.{i}."
            for fused, parts in (
                ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
            ):
                for kind in ("weight", "bias"):
                    names = [f"{prefix}{part}.{kind}" for part in parts]
                    if all(name in renamed for name in names):
                        renamed[f"{prefix}{fused}.{kind}"] = torch.cat([renamed.pop(name) for name in names])
        if self.config.tie_word_embeddings and part in (None, "rest"):
            renamed.pop("lm_head.weight", None)
            if "embed_tokens.weight" in renamed:
                renamed["lm_head.weight"] = renamed["embed_tokens.weight"]
        self.fold_checkpoint(renamed)
        if part is None:
            # assign: a model built on the meta device takes these tensors as they are (no second copy in memory)
            self.load_state_dict(renamed, strict=True, assign=True)
        else:
            prefix = part if part != "rest" else ""

            def mine(name: str) -> bool:
                return name.startswith(prefix) and (part != "rest" or not name.startswith("layers."))

            foreign = [n for n in renamed if not mine(n)]
            missing, unexpected = self.load_state_dict(
                {n: t for n, t in renamed.items() if mine(n)}, strict=False, assign=True
            )
            missing = [n for n in missing if mine(n)]
            if missing or unexpected or foreign:
                raise RuntimeError(f"{part}: missing {sorted(missing)}, unexpected {sorted(unexpected + foreign)}")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def weight_bytes(self) -> int:
        """Bytes of the weights and buffers in memory (a tied embedding counted once; the rotary tables too)."""
        seen: dict[int, int] = {}
        for t in (*self.parameters(), *self.buffers()):
            if t.device.type != "meta" and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and the KV cache's) dtype: fp32, or bf16 for --weights bf16."""
        return self.norm.weight.dtype

    def fold_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Turn the checkpoint's tensors (named as this module's, q/k/v and gate/up fused) into the ones the
        modules compute with, in place. Llama's are used as they are."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend, logits_index: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions [N] -> logits [M, V] for the M token positions in `logits_index`."""
        x = self.embed(input_ids)  # [N, C]
        tables = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = tables[self.rope_for_layer(i)]
            x = layer(x, cos, sin, backend)
        x = self.norm(x[logits_index])  # [M, C]: only the positions we sample from
        return self.lm_head(x).float()  # [M, V]

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's (cos, sin) [N, 1, D] per rotary table."""
        return [(self.rope_cos[positions].unsqueeze(1).to(dtype), self.rope_sin[positions].unsqueeze(1).to(dtype))]

    def rope_for_layer(self, layer: int) -> int:
        return 0
