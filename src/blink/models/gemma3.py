"""Gemma 3 (text): the Llama decoder with
- embeddings scaled by sqrt(hidden_size);
- RMSNorms that multiply by (1 + weight): the checkpoint's weights get their 1 added at load (a GGUF has it added);
- q/k norms per head (as Qwen3), and the query scale 1/sqrt(query_pre_attn_scalar), folded into the q norm;
- four norms a layer: after attention and around the MLP;
- a GeLU (tanh approximation) gated MLP;
- two rotary tables: the global layers' and the sliding-window layers' (`rope_local`), which the attention
  backend restricts to their window (LlamaConfig.window).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blink.models.llama import MLP, AttentionBackend, DecoderLayer, LlamaConfig, LlamaModel, RMSNorm
from blink.models.qwen3 import Qwen3Attention


class GeluMLP(MLP):
    @staticmethod
    def act(gate: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.gelu(gate, approximate="tanh")
        return out


class Gemma3Layer(DecoderLayer):
    attention = Qwen3Attention
    mlp_type = GeluMLP

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, backend))
        out: torch.Tensor = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return out


class Gemma3Model(LlamaModel):
    layer_type = Gemma3Layer
    rope_local_cos: torch.Tensor
    rope_local_sin: torch.Tensor

    def init_rope(self, positions: int | None = None) -> None:
        super().init_rope(positions)
        local = self.config.rope_local or self.config.rope
        self.rope_local_cos, self.rope_local_sin = self.rope_tables(local, None)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        local = self.rope_local_cos[positions].unsqueeze(1).to(dtype), self.rope_local_sin[positions].unsqueeze(1)
        return [*super().rotary(positions, dtype), (local[0], local[1].to(dtype))]

    def rope_for_layer(self, layer: int) -> int:
        kinds = self.config.layer_types
        return 1 if kinds is not None and kinds[layer] == "sliding_attention" else 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def fold_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        if not self.config.norms_offset_folded:
            for name in [n for n in state if n.endswith("norm.weight")]:
                state[name] = state[name].float() + 1.0
        cfg = self.config
        q_scale = math.sqrt(cfg.head_dim) / math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
        if q_scale != 1.0:
            for name in [n for n in state if n.endswith("self_attn.q_norm.weight")]:  # all layers' or one's
                state[name] = state[name].float() * q_scale
