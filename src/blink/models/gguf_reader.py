"""Read a GGUF file into Hugging Face-named float32 tensors, its family and config, and its metadata.

llama.cpp's converter permutes the rows of q_proj/k_proj so its interleaved rotary embedding matches the
reference model; we undo that here, so the prepared weights are laid out as in the original checkpoint and
`llama.py` uses the usual rotate-half rotary embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from blink.models.families import UnsupportedModel, family_for_gguf
from blink.models.llama import LlamaConfig

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
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# the metadata arrays with an element per vocabulary entry: gguf's reader parses each element into numpy objects
# (measured: ~100 MiB for a 49k vocabulary, held as long as the reader)
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


class GGUFModel:
    """An opened GGUF file (memory-mapped): `family` and `config` are read at once, `fields()` on demand (the
    tokenizer's metadata among them); `tensors()` dequantizes one tensor at a time. `metadata=False` (a caller that
    needs the tensors only: loading a prepared model) lets the vocabulary arrays go once the config is read;
    `fields()` then reads the file's metadata again."""

    def __init__(self, path: Path, *, metadata: bool = True) -> None:
        import gguf

        self.path = path
        self._gguf = gguf
        self._reader = gguf.GGUFReader(str(path))
        meta = {"general.architecture": self._field("general.architecture")}
        arch = str(meta["general.architecture"])
        for key in self._reader.fields:
            if key.startswith(f"{arch}.") or key == "tokenizer.ggml.tokens":
                meta[key] = self._field(key)
        self._extra = {t.name: t for t in self._reader.tensors if t.name in _ROPE_TENSORS}
        names = {t.name for t in self._reader.tensors}
        try:
            self.family, config = family_for_gguf(meta, names)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{path.name}: {e}") from None
        self.arch = arch
        self.config = dataclasses.replace(config, **self._rope_tensors(config))
        self._trimmed = not metadata
        if not metadata:
            for key in _VOCAB_ARRAYS:
                self._reader.fields.pop(key, None)

    def _field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def fields(self) -> dict[str, Any]:
        """All the file's metadata (not its header's counts, nor the tensors) as plain values: strings, numbers,
        booleans, and lists of them for arrays. The tokenizer's keys feed `gguf_tokenizer.hf_files`."""
        fields = self._gguf.GGUFReader(str(self.path)).fields if self._trimmed else self._reader.fields
        return {key: field.contents() for key, field in fields.items() if not key.startswith("GGUF.")}

    def _rope_tensors(self, config: LlamaConfig) -> dict[str, Any]:
        """Rotary scaling a GGUF stores as tensors: Llama 3's divisors per frequency, Phi-3's LongRoPE factors."""

        def values(name: str) -> list[float]:
            t = self._extra[name]
            return [float(v) for v in self._gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)]

        if "rope_freqs.weight" in self._extra:
            return {"rope_freq_factors": values("rope_freqs.weight")}
        if "rope_factors_short.weight" in self._extra:
            arch = self.arch
            original = int(self._field(f"{arch}.rope.scaling.original_context_length") or 0)
            rope = {
                **config.rope,
                "rope_type": "longrope",
                "short_factor": values("rope_factors_short.weight"),
                "long_factor": values("rope_factors_long.weight"),
                "original_max_position_embeddings": original or config.max_position_embeddings,
                "factor": config.max_position_embeddings / (original or config.max_position_embeddings),
            }
            if self._field(f"{arch}.rope.scaling.attn_factor") is not None:
                rope["attention_factor"] = float(self._field(f"{arch}.rope.scaling.attn_factor"))
            return {"rope": rope}
        return {}

    def weight_types(self) -> dict[str, int]:
        """How many weight tensors of each GGML type (F32, Q4_K, ...) the file holds."""
        counts: dict[str, int] = {}
        for t in self._reader.tensors:
            if t.name not in _ROPE_TENSORS:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def parameters(self) -> int:
        return sum(int(t.n_elements) for t in self._reader.tensors if t.name not in _ROPE_TENSORS)

    def __len__(self) -> int:
        return len(self._reader.tensors) - len(self._extra)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's Hugging Face name and shape, in the order `tensors()` yields them."""
        return {
            self._hf_name(t.name): tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
            for t in self._reader.tensors
            if t.name not in _ROPE_TENSORS
        }

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf_name, float32 array) for every weight, dequantized and with q/k rows un-permuted."""
        cfg = self.config
        for t in self._reader.tensors:
            if t.name in _ROPE_TENSORS:
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = self._gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
            name = self._hf_name(t.name)
            if self.family.gguf_permuted_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _unpermute(data, cfg.num_attention_heads)
            elif self.family.gguf_permuted_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _unpermute(data, cfg.num_key_value_heads)
            yield name, data

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        blk, index, part, kind = name.split(".")
        module = self.family.gguf_layer_names.get(part) or _LAYER_NAMES.get(part)
        if blk != "blk" or module is None:
            raise UnsupportedModel(f"{self.path.name}: unexpected tensor {name!r} for a {self.family.name} model")
        return f"model.layers.{index}.{module}.{kind}"

    def q4_blocks(self, hf_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A 4-bit weight's own blocks as q4 holds them (w = d * q + m per 32 inputs: q uint8 [N, K] in 0..15, d
        and m fp32 [N, K/32]), read from the file (not mapped: its pages stay out of the process's memory), or None
        for a tensor in another type. Q4_1 is that block; Q4_0 is one with m = -8 d; Q4_K's 256-input super-block
        holds eight: d = d_super * scale_j, m = -dmin * min_j, exact in fp32 (q4 then keeps them as fp16). Rows of
        q/k are un-permuted as `tensors()` does."""
        tensor = self._by_hf_name().get(hf_name)
        kind = tensor.tensor_type.name if tensor is not None else ""
        if tensor is None or kind not in ("Q4_0", "Q4_1", "Q4_K"):
            return None
        n, k = (int(d) for d in reversed(tensor.shape.tolist()))
        with self.path.open("rb") as f:
            f.seek(int(tensor.data_offset))
            raw = np.frombuffer(f.read(int(tensor.n_bytes)), dtype=np.uint8)
        q, d, m = _unpack_4bit(raw, kind, n, k)
        cfg = self.config
        if self.family.gguf_permuted_qk and hf_name.endswith("q_proj.weight"):
            q, d, m = (_unpermute(a, cfg.num_attention_heads) for a in (q, d, m))
        elif self.family.gguf_permuted_qk and hf_name.endswith("k_proj.weight"):
            q, d, m = (_unpermute(a, cfg.num_key_value_heads) for a in (q, d, m))
        return q, d, m

    def _by_hf_name(self) -> dict[str, Any]:
        if not hasattr(self, "_hf_names"):
            self._hf_names = {self._hf_name(t.name): t for t in self._reader.tensors if t.name not in _ROPE_TENSORS}
        return self._hf_names


def _unpack_4bit(raw: np.ndarray, kind: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [n, k], d [n, k/32], m [n, k/32]) of a Q4_0 / Q4_1 / Q4_K tensor's bytes (ggml's layouts: in a block of
    32, byte i holds input i in its low nibble and input i + 16 in its high one; Q4_K's 256 inputs are four
    such 64-input halves, low nibbles first)."""
    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(n * k // 32, size)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        m = -8.0 * d if kind == "Q4_0" else blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = blocks[:, size - 16 :]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [blocks, 32]
        return q.reshape(n, k), d.reshape(n, k // 32), m.reshape(n, k // 32)
    blocks = raw.reshape(n * k // 256, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    a, b, c = packed[:, 0], packed[:, 1], packed[:, 2]
    scale = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1).astype(np.float32)  # [B, 8]
    low = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1).astype(np.float32)
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # four halves of 64 inputs: low nibbles, then high ones
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # [B, 4, 2, 32]
    return q.reshape(n, k), (d * scale).reshape(n, k // 32), (-(dmin * low)).reshape(n, k // 32)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stored rows as [heads, head_dim/2, 2] (pairs interleaved); the checkpoint has [heads, 2, head_dim/2]
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
