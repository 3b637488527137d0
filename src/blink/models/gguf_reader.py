"""Read a GGUF file into Hugging Face-named float32 tensors, a model config and tokenizer metadata.

llama.cpp's converter permutes the rows of q_proj/k_proj so its interleaved rotary embedding matches the
reference model; we undo that here, so the prepared weights are laid out as in the original checkpoint and
`llama.py` uses the usual rotate-half rotary embedding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenizerInfo:
    model: str  # "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name as llama.cpp spells it ("smollm", "qwen2", ...)
    tokens: list[str]
    token_types: list[int]  # 1 normal, 3 control, 4 user-defined, 6 byte
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int
    chat_template: str
    add_bos_token: bool


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFModel:
    """An opened GGUF file. `config`, `tokenizer` are read at once; `tensors()` dequantizes lazily."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        self._gguf = gguf
        self._reader = gguf.GGUFReader(str(path))
        self.arch = str(self._field("general.architecture"))
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"{path.name}: architecture {self.arch!r} is not supported (llama, qwen2)")
        self.config = self._read_config()
        self.tokenizer = self._read_tokenizer()

    def _field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def _read_config(self) -> dict[str, Any]:
        a = self.arch
        n_heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        names = {t.name for t in self._reader.tensors}
        vocab = self._field(f"{a}.vocab_size") or len(self._field("tokenizer.ggml.tokens"))
        return {
            "architecture": a,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", n_heads)),
            "head_dim": int(self._field(f"{a}.rope.dimension_count", hidden // n_heads)),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._field(f"{a}.context_length")),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
        }

    def _read_tokenizer(self) -> TokenizerInfo:
        model = str(self._field("tokenizer.ggml.model"))
        if model != "gpt2":
            raise ValueError(f"{self.path.name}: tokenizer {model!r} is not supported (byte-level BPE 'gpt2')")
        bos = self._field("tokenizer.ggml.bos_token_id")
        return TokenizerInfo(
            model=model,
            pre=str(self._field("tokenizer.ggml.pre", "default")),
            tokens=list(self._field("tokenizer.ggml.tokens")),
            token_types=[int(t) for t in self._field("tokenizer.ggml.token_type")],
            merges=list(self._field("tokenizer.ggml.merges")),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=int(self._field("tokenizer.ggml.eos_token_id")),
            chat_template=str(self._field("tokenizer.chat_template", "")),
            add_bos_token=bool(self._field("tokenizer.ggml.add_bos_token", False)),
        )

    def __len__(self) -> int:
        return len(self._reader.tensors)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf_name, float32 array) for every tensor, dequantized and with q/k rows un-permuted."""
        cfg = self.config
        for t in self._reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
            data = self._gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            name = self._hf_name(t.name)
            if self.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _unpermute(data, cfg["num_attention_heads"])
            elif self.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _unpermute(data, cfg["num_key_value_heads"])
            yield name, data

    @staticmethod
    def _hf_name(name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        blk, index, part, kind = name.split(".")
        if blk != "blk" or part not in _LAYER_NAMES:
            raise ValueError(f"unexpected tensor {name!r}")
        return f"model.layers.{index}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stored rows as [heads, head_dim/2, 2] (pairs interleaved); the checkpoint has [heads, 2, head_dim/2]
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
