"""Prepare a model once into the cache directory, then load it fast.

    prepare(spec, cache_dir) -> folder with model.safetensors, config.json, tokenizer.json

Preparing dequantizes the GGUF (with a progress bar) and takes seconds; a prepared folder is keyed by the
GGUF's name and size and the format version, and written atomically, so a crash never leaves a half folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blink.models.gguf_reader import GGUFModel
from blink.models.llama import LlamaConfig, LlamaModel
from blink.models.registry import ModelSpec
from blink.models.tokenizer import Tokenizer

FORMAT_VERSION = 1


def prepared_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    gguf_path = spec.locate(cache_dir)  # a split model's parts are assembled into cache_dir first
    key = f"{gguf_path.stem}-{gguf_path.stat().st_size}-v{FORMAT_VERSION}"
    return cache_dir / "models" / spec.name / key


def prepare(spec: ModelSpec, cache_dir: Path, *, progress: bool = True) -> Path:
    """Return the prepared folder for `spec`, creating it if needed. Safe to call from several processes."""
    target = prepared_dir(spec, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = GGUFModel(spec.locate(cache_dir))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".prepare-"))
    try:
        tensors: dict[str, torch.Tensor] = {}
        bar = tqdm(gguf.tensors(), total=len(gguf), desc=f"preparing {spec.name}", unit="tensor", disable=not progress)
        for name, array in bar:
            tensors[name] = torch.from_numpy(array).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(gguf.config, indent=1))
        (tmp / "tokenizer.json").write_text(json.dumps(asdict(gguf.tokenizer)))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> tuple[LlamaModel, Tokenizer]:
    """Load a prepared folder into an eval-mode model and its tokenizer."""
    raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
    config = LlamaConfig.from_dict(raw)
    with torch.device("meta"):  # no random initialisation, no second copy of the weights (1.5B: 17 -> ~7 GB peak)
        model = LlamaModel(config)
    state = load_file(str(folder / "model.safetensors"))
    model.load_checkpoint(state)
    model.init_rope()
    model.to(dtype).eval()
    tokenizer = Tokenizer.from_json((folder / "tokenizer.json").read_text())
    return model, tokenizer
