"""The model families blink serves, and how a checkpoint's configuration becomes a `LlamaConfig`.

    family_for_hf(config.json)            -> (Family, LlamaConfig)    a Hugging Face folder
    family_for_gguf(metadata, tensor names) -> (Family, LlamaConfig)  a GGUF file

A family is its model module (llama.py, qwen3.py, gemma3.py, phi3.py), the architecture names it answers to, the
defaults its `transformers` config class assumes when config.json leaves a key out, and the GGUF tensor names that
differ from Llama's. Anything else is refused with one line naming the architecture and the supported list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blink.models.gemma3 import Gemma3Model
from blink.models.llama import LlamaConfig, LlamaModel
from blink.models.phi3 import Phi3Model
from blink.models.qwen3 import Qwen3Model
from blink.models.rope import ROPE_TYPES


class UnsupportedModel(ValueError):
    """The checkpoint is of an architecture or a kind blink does not serve (the message says which and why)."""


@dataclass(frozen=True)
class Family:
    name: str
    model: type[LlamaModel]
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    defaults: Mapping[str, Any]  # what the transformers config class assumes for a key config.json omits
    activation: str = "silu"  # hidden_act / hidden_activation, as transformers names it
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaved q/k's rotary halves (its `llama` arch)
    gguf_layer_names: Mapping[str, str] = field(default_factory=dict)  # blk.N.<name> -> the HF module, where
    # they differ from Llama's


_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

FAMILIES = (
    Family(
        "llama",
        LlamaModel,
        ("LlamaForCausalLM", "MistralForCausalLM"),
        ("llama",),
        _LLAMA_DEFAULTS,
        gguf_permuted_qk=True,
    ),
    Family(
        "qwen2",
        LlamaModel,
        ("Qwen2ForCausalLM",),
        ("qwen2",),
        {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "attention_bias": True},
    ),
    Family(
        "qwen3",
        Qwen3Model,
        ("Qwen3ForCausalLM",),
        ("qwen3",),
        {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768},
        gguf_layer_names=_QK_NORMS,
    ),
    Family(
        "gemma3",
        Gemma3Model,
        ("Gemma3ForCausalLM",),
        ("gemma3",),
        {
            **_LLAMA_DEFAULTS,
            "max_position_embeddings": 131072,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": True,
            "sliding_window": 4096,
            "query_pre_attn_scalar": 256,
        },
        activation="gelu_pytorch_tanh",
        gguf_layer_names={
            **_QK_NORMS,
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
    ),
    Family(
        "phi3",
        Phi3Model,
        ("Phi3ForCausalLM",),
        ("phi3",),
        {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
        gguf_layer_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    ),
)


def supported() -> str:
    return ", ".join(a for f in FAMILIES for a in f.hf_architectures)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModel(f"no model family {name!r}")


def family_for_hf(raw: dict[str, Any]) -> tuple[Family, LlamaConfig]:
    """The family and blink's config of a Hugging Face config.json."""
    architectures = raw.get("architectures") or [str(raw.get("model_type", "?"))]
    family = next((f for f in FAMILIES if architectures[0] in f.hf_architectures), None)
    if family is None:
        raise UnsupportedModel(f"architecture {architectures[0]} is not supported; blink serves {supported()}")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise UnsupportedModel(
            f"{architectures[0]} quantized with {method!r} is not supported; serve its fp16/bf16/fp32 safetensors "
            "or a GGUF"
        )

    def get(key: str) -> Any:
        return raw[key] if raw.get(key) is not None else family.defaults.get(key)

    activation = raw.get("hidden_activation") or raw.get("hidden_act") or family.activation
    if activation != family.activation:
        raise UnsupportedModel(f"{architectures[0]} with activation {activation!r} is not supported")
    if raw.get("mlp_bias"):
        raise UnsupportedModel(f"{architectures[0]} with MLP biases is not supported")
    heads = int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)
    global_rope, local_rope = _hf_rope(raw, get)
    layers = int(raw["num_hidden_layers"])
    layer_types = _layer_types(raw, family, layers)
    window = get("sliding_window") if _slides(raw, family, layer_types) else None
    config = LlamaConfig(
        architecture=family.name,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=bool(get("attention_bias")),
        rope=global_rope,
        rope_local=local_rope,
        layer_types=layer_types,
        sliding_window=None if window is None else int(window),
        query_pre_attn_scalar=get("query_pre_attn_scalar") if family.name == "gemma3" else None,
    )
    return family, config


def _hf_rope(raw: dict[str, Any], get: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the global layers' rope, the sliding layers' own or None), from transformers 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        rope, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {}) or None
    elif isinstance(params, dict):
        rope, local = dict(params), None
    else:
        rope = {"rope_theta": get("rope_theta"), **(raw.get("rope_scaling") or {})}
        base = raw.get("rope_local_base_freq")
        local = {"rope_type": "default", "rope_theta": base} if base else None
    for r in (rope, local):
        if r is None:
            continue
        kind = str(r.get("rope_type") or r.get("type") or "default")
        r["rope_type"] = "longrope" if kind == "su" else kind
        r.setdefault("rope_theta", get("rope_theta"))
        if r["rope_type"] not in ROPE_TYPES:
            raise UnsupportedModel(f"rope scaling {r['rope_type']!r} is not supported ({', '.join(ROPE_TYPES)})")
        if float(r.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0) != 1.0:
            raise UnsupportedModel("a partial rotary embedding (partial_rotary_factor < 1) is not supported")
        if r["rope_type"] in ("longrope", "yarn", "llama3"):
            original = r.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
            r["original_max_position_embeddings"] = int(original or get("max_position_embeddings"))
        if r["rope_type"] == "longrope" and not r.get("factor"):
            r["factor"] = int(get("max_position_embeddings")) / r["original_max_position_embeddings"]
    return rope, local


def _layer_types(raw: dict[str, Any], family: Family, layers: int) -> list[str] | None:
    if raw.get("layer_types"):
        return [str(t) for t in raw["layer_types"]]
    if family.name == "gemma3":
        return _gemma_layer_types(layers, int(raw.get("sliding_window_pattern") or 6))
    return None


def _gemma_layer_types(layers: int, pattern: int = 6) -> list[str]:
    """Every `pattern`-th layer global, the others local (Gemma 3: five local, one global)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _slides(raw: dict[str, Any], family: Family, layer_types: list[str] | None) -> bool:
    if layer_types is not None:
        return "sliding_attention" in layer_types
    if family.name in ("qwen2", "qwen3"):
        return bool(raw.get("use_sliding_window"))
    return raw.get("sliding_window") is not None


def family_for_gguf(meta: Mapping[str, Any], tensor_names: set[str]) -> tuple[Family, LlamaConfig]:
    """The family and blink's config of a GGUF's metadata (`general.architecture`, `<arch>.*`)."""
    arch = str(meta.get("general.architecture"))
    family = next((f for f in FAMILIES if arch in f.gguf_architectures), None)
    if family is None:
        names = ", ".join(a for f in FAMILIES for a in f.gguf_architectures)
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported; blink serves {names}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}")
        return default if value is None else value

    heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    layers = int(get("block_count"))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = str(get("rope.scaling.type", "none"))
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(get("rope.scaling.factor")))
        rope["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length", 0)) or None
    elif scaling not in ("none", ""):
        raise UnsupportedModel(f"GGUF rope scaling {scaling!r} is not supported")
    gemma = family.name == "gemma3"
    layer_types = _gemma_layer_types(layers) if gemma else None
    window = get("attention.sliding_window")
    config = LlamaConfig(
        architecture=family.name,
        vocab_size=int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope=rope,
        rope_local={"rope_type": "default", "rope_theta": 10000.0} if gemma else None,
        layer_types=layer_types,
        sliding_window=None if window is None or (family.name != "gemma3" and family.name != "phi3") else int(window),
        query_pre_attn_scalar=head_dim if gemma else None,
        norms_offset_folded=gemma,
    )
    return family, config
