"""Phi-3 (mini, medium): the Llama decoder as it is; its checkpoint holds q/k/v and gate/up fused already (the
layout blink computes with), and its 128k variants scale the rotary embedding with LongRoPE (rope.py). The mini's
layers attend over a 2047-token sliding window (LlamaConfig.window)."""

from __future__ import annotations

from blink.models.llama import LlamaModel


class Phi3Model(LlamaModel):
    pass
