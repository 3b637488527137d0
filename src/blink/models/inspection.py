"""`blink inspect MODEL`: what blink sees in a model, read from its headers (no weights loaded, nothing prepared).

    report(model, cache_dir, max_model_len=, kv_cache_mb=) -> dict   (`render` makes it the lines the CLI prints)

Architecture and family, parameters, the weights' formats as stored, context length (the checkpoint's, and the one
blink will serve), the tokenizer and chat template, memory (weights as served, KV per token, what --kv-cache-mb
holds) and whether blink can serve it, or why not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from blink.errors import ModelNotFound
from blink.models import families, loader, source
from blink.models.families import UnsupportedModel
from blink.models.llama import LlamaConfig

_FLOAT_BYTES = 4  # the KV cache and embeddings are fp32


def report(
    model: str, cache_dir: Path, *, max_model_len: int = 2048, kv_cache_mb: int = 512, kv_dtype_bytes: int = 4
) -> dict[str, Any]:
    """`kv_dtype_bytes`: 4 for an fp32 KV cache, 2 for fp16 or bf16 (config.kv_cache_bytes)."""
    out: dict[str, Any] = {"model": model}
    try:
        src = source.resolve(model)
        path = src.locate(cache_dir)
        out.update(name=src.name, path=str(path), format=src.kind)
        config, details = _gguf(path) if src.kind == "gguf" else _folder(path)
    except (ModelNotFound, UnsupportedModel, ValueError, OSError) as e:
        return {**out, "servable": False, "reason": str(e)}
    out.update(details)
    context = min(max_model_len, config.context_length)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_dtype_bytes
    out.update(
        family=config.architecture,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        heads=f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value",
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        tied_embeddings=config.tie_word_embeddings,
        rope=config.rope,
        context_length=config.max_position_embeddings,
        served_context=context,
        sliding_window=config.sliding_window,
        memory={
            "weights_w8a8_mib": round(_w8a8_bytes(config) / 2**20, 1),
            "weights_fp32_mib": round(out["parameters"] * _FLOAT_BYTES / 2**20, 1),
            "kv_bytes_per_token": kv_per_token,
            "kv_one_full_sequence_mib": round(context * kv_per_token / 2**20, 1),
            "kv_cache_mb_tokens": kv_cache_mb * 2**20 // kv_per_token,
        },
    )
    if kv_cache_mb * 2**20 // kv_per_token < context:
        return {
            **out,
            "servable": False,
            "reason": f"--kv-cache-mb {kv_cache_mb} holds fewer tokens than one sequence "
            f"of {context}; raise it to {-(-context * kv_per_token // 2**20)} or lower --max-model-len",
        }
    return {**out, "servable": True, "reason": ""}


def _w8a8_bytes(cfg: LlamaConfig) -> int:
    """The weights as blink serves them by default: linear layers int8 (one byte a weight), the embedding fp32,
    and a tied output layer's own int8 copy."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attention = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    linear = cfg.num_hidden_layers * (attention + 3 * h * i) + cfg.vocab_size * h
    return linear + cfg.vocab_size * h * _FLOAT_BYTES


def _gguf(path: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    from blink.models.gguf_reader import GGUFModel

    gguf = GGUFModel(path)
    fields = gguf.fields()
    return gguf.config, {
        "architecture": gguf.arch,
        "parameters": gguf.parameters(),
        "weights": gguf.weight_types(),
        "file_mib": round(path.stat().st_size / 2**20, 1),
        "tokenizer": str(fields.get("tokenizer.ggml.model", "?")),
        "chat_template": bool(fields.get("tokenizer.chat_template")),
    }


def _folder(path: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    raw = json.loads((path / "config.json").read_text())
    _, config = families.family_for_hf(raw)
    counts: dict[str, int] = {}
    parameters = 0
    files = loader.weight_files(path)
    for file in files:
        for entry in loader.safetensors_header(file).values():
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
            parameters += math.prod(entry["shape"])
    tok_config = path / "tokenizer_config.json"
    template = (path / "chat_template.jinja").is_file() or (
        tok_config.is_file() and bool(json.loads(tok_config.read_text()).get("chat_template"))
    )
    if not (path / "tokenizer.json").is_file():
        raise UnsupportedModel(f"{path}: no tokenizer.json (blink reads the fast tokenizer's file)")
    return config, {
        "architecture": (raw.get("architectures") or ["?"])[0],
        "parameters": parameters,
        "weights": counts,
        "file_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "tokenizer": "tokenizer.json",
        "chat_template": template,
    }


def render(info: dict[str, Any]) -> str:
    """The report as aligned `key: value` lines."""
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if key == "reason" and not value:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
