"""The all-MiniLM-L6-v2 embedder with its real weights: geometry, padding invariance, strict loading, and the
reference implementation (transformers' BertModel on the same files)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blink.models.bert import Embedder, _packaged_model

EATING = "A man is eating food."
BREAD = "A man is eating a piece of bread."
HORSE = "A man is riding a horse."
UNRELATED = "Quarterly interest rates were left unchanged by the central bank."
LONG = "The quick brown fox jumps over the lazy dog, " * 20  # longer than every other text: the others get padding


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


def test_embeddings_are_unit_rows_of_the_model_width(embedder: Embedder) -> None:
    vectors = embedder.embed([EATING, BREAD, ""])
    assert embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated_ones(embedder: Embedder) -> None:
    eating, bread, horse, unrelated = embedder.embed([EATING, BREAD, HORSE, UNRELATED])
    assert eating @ bread > eating @ horse > eating @ unrelated
    assert eating @ bread - eating @ unrelated > 0.5
    assert 0.6 < eating @ bread < 0.9  # all-MiniLM-L6-v2's published cosine for this pair is about 0.75


def test_a_text_embeds_the_same_alone_and_padded_in_a_batch(embedder: Embedder) -> None:
    alone = embedder.embed([EATING])
    batched = embedder.embed([LONG, EATING])
    assert len(embedder.tokenizer.encode(LONG).ids) > len(embedder.tokenizer.encode(EATING).ids)
    np.testing.assert_allclose(batched[1:], alone, atol=1e-5)


def test_texts_beyond_one_batch_and_the_token_limit_are_embedded(embedder: Embedder) -> None:
    texts = [f"sentence number {i}" for i in range(40)] + ["word " * 1000]
    vectors = embedder.embed(texts)
    assert len(embedder.tokenizer.encode(texts[-1]).ids) == 256
    np.testing.assert_allclose(vectors[35], embedder.embed([texts[35]])[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_fits_tells_whether_the_whole_text_is_read(embedder: Embedder) -> None:
    # 254 words + [CLS] and [SEP]: exactly the 256 tokens the model reads; one word more is cut off
    assert embedder.fits("word " * 254) and not embedder.fits("word " * 255)
    assert embedder.fits(EATING) and embedder.fits("")


@pytest.mark.parametrize("change", ["drop", "add"])
def test_loading_fails_on_a_missing_or_unexpected_weight(tmp_path: Path, change: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(_packaged_model(), model, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(_packaged_model() / "model.safetensors")
    if change == "drop":
        del weights["encoder.layer.3.output.dense.bias"]
    else:
        weights["encoder.layer.6.output.dense.bias"] = torch.zeros(384)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"layers\.[36]\.ffn_out\.bias"):
        Embedder.load(model)


@pytest.mark.slow
def test_matches_transformers_bert_with_mean_pooling(embedder: Embedder) -> None:
    transformers = pytest.importorskip("transformers")  # a test-only dependency, always installed by `make test`
    path = _packaged_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertModel.from_pretrained(str(path)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    texts = [EATING, LONG, "café 🚀 日本語 and UPPER case"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state  # [B, S, D]
    mask = batch["attention_mask"][:, :, None].float()
    reference = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(embedder.embed(texts), reference, atol=1e-5)
