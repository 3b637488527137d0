"""Prepare a model once into the cache directory, then load it fast.

    prepare(source, cache_dir) -> a folder: a GGUF's prepared one, or a Hugging Face folder as it is
    load(folder, context=N)    -> (model, tokenizer)
    load(folder, context=N, convert=quant.Converter(...)) -> the same, its weights converted layer by layer as
                                  they are read (only one layer's fp32 weights in memory at a time)

A GGUF is prepared once: its tensors dequantized into fp32 safetensors (with a progress bar), its configuration
into `blink-config.json`, its tokenizer into Hugging Face's files (gguf_tokenizer.py). The prepared folder is
keyed by the file's sha256 (computed once per file, size and mtime) and the format version, written tensor by
tensor (never the whole model in memory) into a temporary folder renamed when complete, so a crash never leaves
a half folder and several processes may race. A Hugging Face folder (config.json, *.safetensors, tokenizer.json)
is read in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from tqdm import tqdm

from blink.models import families, gguf_tokenizer
from blink.models.families import Family, UnsupportedModel
from blink.models.gguf_reader import GGUFModel
from blink.models.llama import LlamaConfig, LlamaModel
from blink.models.source import ModelSource
from blink.models.tokenizer import Tokenizer

FORMAT_VERSION = 2
BLINK_CONFIG = "blink-config.json"  # a prepared GGUF's LlamaConfig (a Hugging Face folder has config.json)
_CHUNK = 8 << 20


def content_hash(path: Path, cache_dir: Path) -> str:
    """sha256 of the file at `path`, remembered in the cache by (path, size, mtime): hashed once per file."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir / "hashes" / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest.hexdigest())
    os.replace(tmp, memo)
    return digest.hexdigest()


def prepared_dir(source: ModelSource, cache_dir: Path) -> Path:
    """Where `source` is (or will be) prepared; a folder source is its own."""
    located = source.locate(cache_dir)  # a split bundled model's parts are assembled into cache_dir first
    if source.kind == "folder":
        return located
    digest = source.spec.sha256 if source.spec is not None and source.spec.sha256 else content_hash(located, cache_dir)
    return cache_dir / "models" / f"{digest[:20]}-v{FORMAT_VERSION}"


def prepare(source: ModelSource, cache_dir: Path, *, progress: bool = True) -> Path:
    """Return the prepared folder for `source`, creating it if needed. Safe to call from several processes.
    Raises UnsupportedModel for a model blink cannot serve."""
    target = prepared_dir(source, cache_dir)
    if source.kind == "folder" or (target / BLINK_CONFIG).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = GGUFModel(source.locate(cache_dir))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".prepare-"))
    try:
        bar = tqdm(
            gguf.tensors(), total=len(gguf), desc=f"preparing {source.name}", unit="tensor", disable=not progress
        )
        _write_safetensors(tmp / "model.safetensors", gguf.shapes(), bar)
        for name, text in gguf_tokenizer.hf_files(gguf.fields()).items():
            (tmp / name).write_text(text)
        (tmp / BLINK_CONFIG).write_text(json.dumps(asdict(gguf.config), indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterator[tuple[str, np.ndarray]]
) -> None:
    """A safetensors file of fp32 tensors written one at a time: the header from the shapes known in advance,
    then each tensor's bytes as it arrives (in the order of `shapes`)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for (name, array), expected in zip(tensors, shapes, strict=True):
            assert name == expected and array.dtype == np.float32, (name, expected, array.dtype)
            f.write(np.ascontiguousarray(array).data)  # the array's own bytes, no copy
        f.flush()
        os.fsync(f.fileno())


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors: name -> {dtype, shape, data_offsets} (its __metadata__ left out)."""
    with path.open("rb") as f:
        return _header(f)[0]


def _header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """(the tensors' entries, where their data starts) of the safetensors file open in `f`."""
    (size,) = struct.unpack("<Q", f.read(8))
    header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, read one at a time into memory of their own: never the file mapped
    whole beside the copies (safe_open maps it, and the pages it touches count in the process's memory until it
    closes: a 6 GB model measured ~12 GB at its peak)."""
    with path.open("rb") as f:
        header, start = _header(f)
        for name, entry in sorted(header.items(), key=lambda e: e[1]["data_offsets"][0]):
            yield name, _read_tensor(f, path, name, entry, start)


def _read_tensor(f: io.BufferedReader, path: Path, name: str, entry: dict[str, Any], start: int) -> torch.Tensor:
    if entry["dtype"] not in _DTYPES:
        raise UnsupportedModel(f"{path.name}: tensor {name} has type {entry['dtype']}, not a float type")
    begin, end = entry["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(raw.numpy().data) != end - begin:
        raise UnsupportedModel(f"{path.name}: truncated at tensor {name}")
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to ("model.layers.3.mlp.up_proj.weight" -> 3), or None."""
    parts = name.removeprefix("model.").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def read_by_layer(folder: Path) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """The folder's tensors as fp32 in pieces of the model: first everything outside the layers (None), then
    each layer's (its index), in layer order whatever the files' order (shards, names sorted as text), so a
    reader holds one layer at a time."""
    where: dict[int | None, list[tuple[Path, str]]] = {}
    for path in weight_files(folder):
        for name in safetensors_header(path):
            if not name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved the rotary buffer
                where.setdefault(_layer_of(name), []).append((path, name))
    for piece in sorted(where, key=lambda i: -1 if i is None else i):
        tensors: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for path, name in where[piece]:
            by_file.setdefault(path, []).append(name)
        for path, names in by_file.items():
            with path.open("rb") as f:
                header, start = _header(f)
                for name in names:
                    tensors[name] = _read_tensor(f, path, name, header[name], start).float()  # 16-bit: a copy
        yield piece, tensors


def read_config(folder: Path) -> tuple[Family, LlamaConfig]:
    """The family and config of a prepared folder or a Hugging Face folder."""
    if (folder / BLINK_CONFIG).is_file():
        config = LlamaConfig.from_dict(json.loads((folder / BLINK_CONFIG).read_text()))
        return families.by_name(config.architecture), config
    return families.family_for_hf(json.loads((folder / "config.json").read_text()))


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder}: no *.safetensors weights (blink reads safetensors, not .bin or .pt)")
    return files


def _check_loaded(folder: Path, model: LlamaModel, piece: int | None) -> None:
    """Every weight of the piece (a layer, or None: the rest) is loaded, else UnsupportedModel."""
    if piece is not None:
        params = list(model.layers[piece].parameters())
    else:
        params = [p for name, p in model.named_parameters() if not name.startswith("layers.")]
    if any(p.is_meta for p in params):
        what = f"layer {piece}" if piece is not None else "the embeddings"
        raise UnsupportedModel(f"{folder}: no weights for {what}")


class Converter(Protocol):
    """What converts a model's weights as it loads (quant.Converter): `start` once the pieces outside the
    layers are in, `layer(model, i)` once layer i's are, `finish` at the end."""

    def start(self, model: LlamaModel) -> None: ...
    def layer(self, model: LlamaModel, index: int) -> None: ...
    def finish(self, model: LlamaModel) -> None: ...


def load(
    folder: Path,
    *,
    context: int | None = None,
    convert: Converter | None = None,
) -> tuple[LlamaModel, Tokenizer]:
    """Load a prepared or Hugging Face folder into an eval-mode model and its tokenizer; the rotary tables cover
    `context` positions (default: all the model's). The weights are read piece by piece (read_by_layer) into a
    model built on the meta device: with `convert`, each layer is converted as soon as it is in, so the fp32
    weights of one layer are in memory at a time, not the model's (the 135M model's load peaked ~500 MB higher
    without it)."""
    family, config = read_config(folder)
    with torch.device("meta"):  # no random initialisation, no second copy of the weights (1.5B: 17 -> ~7 GB peak)
        model = family.model(config)
    model.init_rope(min(config.context_length, context) if context else None)
    for piece, state in read_by_layer(folder):
        if piece is not None and piece >= config.num_hidden_layers:
            raise UnsupportedModel(f"{folder}: weights for layer {piece}, but the model has {config.num_hidden_layers}")
        try:
            model.load_checkpoint(state, part="rest" if piece is None else f"layers.{piece}.")
        except (RuntimeError, KeyError) as e:
            raise UnsupportedModel(f"{folder}: its weights do not match a {family.name} model: {e}") from None
        if convert is not None:  # (load_checkpoint checked the piece whole)
            convert.start(model) if piece is None else convert.layer(model, piece)
    for piece in (None, *range(config.num_hidden_layers)):  # a piece with no tensors at all
        _check_loaded(folder, model, piece)
    if convert is not None:
        convert.finish(model)
    return model.eval(), Tokenizer.from_folder(folder)
