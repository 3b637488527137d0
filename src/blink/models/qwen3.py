"""Qwen3: the Llama decoder with an RMSNorm over each head of q and of k before the rotary embedding (and no
q/k/v biases)."""

from __future__ import annotations

import torch

from blink.models.llama import Attention, DecoderLayer, LlamaConfig, LlamaModel, RMSNorm


class Qwen3Attention(Attention):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q_norm(qk[:, : self.n_heads]), self.k_norm(qk[:, self.n_heads :])), dim=1)


class Qwen3Layer(DecoderLayer):
    attention = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_type = Qwen3Layer
