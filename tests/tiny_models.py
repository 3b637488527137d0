"""Tiny random-weight models of every family blink serves, made with `transformers` in each family's real
configuration shape (GQA ratios, head dims other than hidden/heads, rope scaling, tied or untied embeddings), and
written both as a Hugging Face folder and as a GGUF the way llama.cpp's converter writes one. Tests only: a few
MB each, built in seconds, nothing downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


@dataclass(frozen=True)
class Tiny:
    family: str  # our key; the transformers config class and the GGUF architecture below
    config_class: str
    gguf_arch: str
    config: dict[str, Any]
    tokenizer: str = "bpe"  # "bpe" (byte-level, Llama 3 / Qwen) or "spm" (SentencePiece style, Llama 2 / Gemma / Phi-3)
    extra: dict[str, Any] = field(default_factory=dict)


_COMMON = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "initializer_range": 0.05}

TINY = {
    "llama": Tiny(  # Llama 3.2's shape: GQA 4:1... here 4 heads over 2 KV heads, llama3 rope scaling, tied
        "llama",
        "LlamaConfig",
        "llama",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
        },
    ),
    "mistral": Tiny(  # Mistral 7B v0.3's shape: 4:1 GQA, head_dim 128, untied, no sliding window, SentencePiece
        "mistral",
        "MistralConfig",
        "llama",
        {
            **_COMMON,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 128,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
        },
        tokenizer="spm",
    ),
    "qwen2": Tiny(  # Qwen2.5 0.5B's shape: biases on q/k/v, 7:1 GQA (here 2:1), tied
        "qwen2",
        "Qwen2Config",
        "qwen2",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
    ),
    "qwen3": Tiny(  # Qwen3 0.6B's shape: q/k norms, head_dim 128 != hidden / heads, untied here
        "qwen3",
        "Qwen3Config",
        "qwen3",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": False,
        },
    ),
    "gemma3": Tiny(  # Gemma 3 270M's shape: 1 KV head, head_dim 256 > hidden / heads, five local layers to one
        "gemma3",  # global (two rotary bases), q/k norms, (1 + w) norms, sqrt(hidden) embedding scale, tied
        "Gemma3TextConfig",
        "gemma3",
        {
            **_COMMON,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 512,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
        },
        tokenizer="spm",
    ),
    "phi3": Tiny(  # Phi-3 mini's shape: fused qkv and gate_up in the checkpoint, head_dim 96 (here 64), SentencePiece
        "phi3",
        "Phi3Config",
        "phi3",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "sliding_window": 2047,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
        },
        tokenizer="spm",
    ),
}


def hf_model(tiny: Tiny, vocab_size: int, *, seed: int = 0) -> torch.nn.Module:
    """The random-weight `transformers` model (fp32, eval)."""
    import transformers

    config = getattr(transformers, tiny.config_class)(vocab_size=vocab_size, **tiny.config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # norms at 1 (or gemma's 0) are not random: give them some spread so a mix-up of norms shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# --- GGUF, as llama.cpp's convert_hf_to_gguf.py writes it -------------------------------------------------------

_LAYER = {  # HF module -> GGUF tensor, where every family agrees
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",  # phi3
    "mlp.gate_up_proj": "ffn_up",  # phi3: gate and up fused in ffn_up
}
_GEMMA = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(tiny: Tiny, hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module...>.<weight|bias>
    module = ".".join(parts[3:-1])
    names = {**_LAYER, **(_GEMMA if tiny.gguf_arch == "gemma3" else {"post_attention_layernorm": "ffn_norm"})}
    return f"blk.{parts[2]}.{names[module]}.{parts[-1]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp interleaves the rotary halves of q/k rows for its `llama` architecture
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_freq_factors(cfg: Any) -> np.ndarray:
    rope = cfg.rope_parameters if getattr(cfg, "rope_parameters", None) else cfg.rope_scaling
    dim = cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _random_blocks(qtype: Any, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks of a K-quant type (gguf-py can read them but not write them): random bits, small scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    tiny = lambda v: np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)  # noqa: E731
    name = qtype.name
    if name in ("Q4_K", "Q5_K"):  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = tiny(2e-4), tiny(1e-4)
    elif name == "Q6_K":  # d last
        raw[..., size - 2 : size] = tiny(2e-5)
    else:
        raise ValueError(name)
    return raw.reshape(rows, -1)


def write_gguf(
    tiny: Tiny, model: torch.nn.Module, tokenizer_folder: Path, path: Path, qtype: str = "F32", *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF of weight type `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; 1-D
    tensors stay F32, a matrix whose rows do not split into the type's blocks falls back to Q8_0 or F16, as
    llama.cpp does). Returns the weights the file holds, dequantized, in the model's own naming and layout (what a
    reference model must be given to compute what the GGUF computes). K-quant weights are random blocks, not a
    quantization of the model's: gguf-py cannot write K-quants."""
    import gguf

    from tests.tiny_tokenizers import add_tokenizer_to_gguf

    cfg = model.config
    arch = tiny.gguf_arch
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{tiny.family}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = cfg.rope_parameters if getattr(cfg, "rope_parameters", None) else {"rope_theta": cfg.rope_theta}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    if arch in ("gemma3", "phi3") and getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    add_tokenizer_to_gguf(writer, tokenizer_folder)

    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType[qtype]
    held: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_freq_factors(cfg))
    for hf, tensor in state.items():
        data = tensor.detach().float().numpy()
        if arch == "gemma3" and hf.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma norms hold their + 1
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, cfg.num_key_value_heads)
        stored, raw_dtype, held_data = _store(data, kind, rng)
        if raw_dtype is None:
            writer.add_tensor(_gguf_name(tiny, hf), stored)
        else:
            writer.add_tensor(_gguf_name(tiny, hf), stored, raw_dtype=raw_dtype)
        if arch == "gemma3" and hf.endswith("norm.weight"):
            held_data = held_data - 1.0
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            heads = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
            held_data = _unpermute(held_data, heads)
        held[hf] = torch.from_numpy(np.ascontiguousarray(held_data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _store(data: np.ndarray, kind: Any, rng: np.random.Generator) -> tuple[np.ndarray, Any, np.ndarray]:
    """(the array to write, its GGML type when quantized (None: a float array), the values it holds)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    if data.ndim == 1 or kind == T.F32:
        return data.astype(np.float32), None, data.astype(np.float32)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if data.shape[-1] % block:
        kind = T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    if kind == T.F16:
        half = data.astype(np.float16)
        return half, None, half.astype(np.float32)
    raw = _random_blocks(kind, *data.shape, rng) if kind.name.endswith("_K") else gguf.quants.quantize(data, kind)
    return raw, kind, gguf.quants.dequantize(raw, kind).reshape(data.shape).astype(np.float32)


def greedy_alone_then_batched(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt from blink's engine: the first alone (a cold cache), then the rest in one
    batch (sharing steps, and any prefix-cache blocks they have in common with the first)."""
    from blink.engine.sequence import SamplingParams

    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for group in ([0], range(1, len(prompts))):
        for i in group:
            engine.add_request(str(i), prompts[i], SamplingParams(max_tokens=max_tokens, temperature=0))
        while engine.has_work():
            for out in engine.step():
                if out.token_id is not None:
                    got[out.request_id].append(out.token_id)
    return [got[str(i)] for i in range(len(prompts))]


def random_llama(seed: int, family: Any = None, **changes: Any) -> Any:
    """A tiny Llama-shaped blink model (`family`: a LlamaModel subclass, default LlamaModel) with random weights (no
    files): for engine tests that need a model, not a family's exact configuration."""
    from blink.models.llama import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    raw: dict[str, Any] = {
        "vocab_size": 96,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "attention_bias": False,
        **changes,
    }
    model = (family or LlamaModel)(LlamaConfig.from_dict(raw))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()
