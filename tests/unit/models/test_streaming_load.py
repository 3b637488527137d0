"""Loading converts layer by layer (loader.load with a quant.Converter): the fp32 weights of one layer are in
memory at a time, and the model that comes out is bit for bit the one converting the whole loaded model gives,
in every family and format, calibration included; the pieces come in layer order whatever the files' order."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

from blink.models import loader, quant
from blink.models.families import UnsupportedModel
from tests.tiny_models import TINY, hf_model
from tests.tiny_tokenizers import family_tokenizer


def save(family: str, folder: Path, **config: object) -> Path:
    family_tokenizer(family, folder)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(folder)))
    tiny = TINY[family]
    tiny = type(tiny)(**{**tiny.__dict__, "config": {**tiny.config, **config}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # small shards: a layer's tensors split between files, and the files' order is not the layers'
        hf_model(tiny, vocab).save_pretrained(str(folder), max_shard_size="300KB")
    return folder


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("weights", ["w8a8", "q4", "int8", "bf16"])
def test_converting_while_loading_gives_the_whole_models_conversion(family: str, weights: str, tmp_path: Path) -> None:
    folder = save(family, tmp_path)
    assert len(loader.weight_files(folder)) > 1
    whole, tok = loader.load(folder, context=256)
    ids = tok.encode(quant.CALIBRATION_TEXT)
    want = state(quant.convert(whole, weights, ids))
    streamed, _ = loader.load(folder, context=256, convert=quant.Converter(weights, ids))
    got = state(streamed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_pieces_come_in_layer_order_whatever_the_files_order(tmp_path: Path) -> None:
    folder = save("llama", tmp_path, num_hidden_layers=12)
    pieces = [piece for piece, _ in loader.read_by_layer(folder)]
    assert pieces == [None, *range(12)]  # as text the files' names sort 0, 1, 10, 11, 2, ...


def test_a_folder_missing_a_layer_is_refused_with_its_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = save("llama", tmp_path, num_hidden_layers=3)
    kept = {}
    for path in loader.weight_files(folder):
        kept.update({k: v.clone() for k, v in loader.read_safetensors(path) if ".layers.1." not in k})
        path.unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(kept, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match="layer 1"):
        loader.load(folder, convert=quant.Converter("q4"))
