"""q4 keeps a GGUF's own 4-bit blocks (Q4_0, Q4_1, Q4_K) as they are instead of quantizing their fp32 values
again (GGUFModel.q4_blocks, quant.Converter): the served weights are the file's, exactly for Q4_0/Q4_1 and up to
fp16 rounding of Q4_K's products of scales, in every projection (q/k rows un-permuted, fused q/k/v and gate/up
assembled part by part), and q4's packing round-trips."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

from blink.config import EngineConfig, ModelConfig
from blink.models import native
from blink.models.q4 import Q4Linear
from blink.worker import loading
from tests.tiny_models import TINY, hf_model, write_gguf
from tests.tiny_tokenizers import family_tokenizer

# the projections' weights as the checkpoint names them, per fused module
PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def test_packing_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    q, d, m = native.q4_quantize(torch.randn(40, 96, generator=gen))  # 40 rows: a padded last block
    got = native.q4_unpack(native.q4_pack(q, d, m), 40)
    assert all(torch.equal(a, b) for a, b in zip(got, (q, d, m), strict=True))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q4_serves_the_files_own_blocks(family: str, qtype: str, tmp_path: Path) -> None:
    tok_folder = tmp_path / "tok"
    family_tokenizer(family, tok_folder)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tok_folder)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = hf_model(TINY[family], vocab)
    path = tmp_path / f"tiny-{qtype}.gguf"
    held = write_gguf(TINY[family], reference, tok_folder, path, qtype)
    config = ModelConfig(model=str(path), cache_dir=tmp_path / "cache")
    model, _ = loading.load_model(str(path), "q4", config, EngineConfig(), progress=False)
    checked = 0
    for i, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            if not isinstance(module, Q4Linear):
                continue
            parts = PARTS.get(name, (name,))
            want = torch.cat([held[f"model.layers.{i}.{p}.weight"] for p in parts])
            q, d, m = native.q4_unpack(module.weight_packed, module.out_features)
            got = (q.float().view(len(q), -1, 32) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).view(len(q), -1)
            if qtype == "Q4_K":  # scale products kept in fp16 (2^-11 relative): far inside a re-quantization's
                # error (half a step: 1/30 of the block's range)
                bound = 2.0**-9 * want.view(len(q), -1, 32).abs().amax(-1, keepdim=True) + 1e-12
                assert bool(((got - want).abs().view(len(q), -1, 32) <= bound).all()), name
            else:
                assert torch.equal(got, want), name
            checked += 1
    assert checked == 4 * len(model.layers)


def test_a_gguf_opened_for_its_tensors_drops_the_vocabulary_and_still_reads_all_metadata(tmp_path: Path) -> None:
    """Loading opens the GGUF for its tensors only (metadata=False): the reader's per-entry vocabulary arrays go
    (~100 MiB for a 49k vocabulary, held through the load before), the config is the same, and fields() reads the
    file's metadata again, whole."""
    from blink.models.gguf_reader import _VOCAB_ARRAYS, GGUFModel

    tok_folder = tmp_path / "tok"
    family_tokenizer("llama", tok_folder)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tok_folder)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = hf_model(TINY["llama"], vocab)
    path = tmp_path / "tiny.gguf"
    write_gguf(TINY["llama"], reference, tok_folder, path, "Q4_1")
    full, lean = GGUFModel(path), GGUFModel(path, metadata=False)
    assert "tokenizer.ggml.tokens" in full._reader.fields
    assert not any(key in lean._reader.fields for key in _VOCAB_ARRAYS)
    assert lean.config == full.config and lean.family is full.family
    assert lean.weight_types() == full.weight_types()
    assert lean.fields() == full.fields() and len(full.fields()["tokenizer.ggml.tokens"]) == vocab
