"""Sentence embeddings for the semantic cache and the document store: all-MiniLM-L6-v2, run by ONNX Runtime.

    embedder = load_embedder("onnx", cache_dir, threads=2)   # exports the model into cache_dir on first use
    vectors = embedder.embed(["How do I cancel my subscription?"])   # float32 [1, 384], unit rows

Runtimes (the plug point is the `Embedder` protocol and the `EMBEDDERS` table), measured on this 2-core VM,
one question at a time on one thread (benchmarks/results/semantic_cache.md):
  onnx-int8  ONNX Runtime with int8 weights per output channel (dynamic quantisation of the fp32 export): the
             default. ~2x faster than fp32 ONNX; each vector moves a little (cosine to fp32 0.985-0.999), and on
             the labelled pairs the cache decides almost the same (recall 74.7% vs 76.6%, precision 99.5% vs
             99.6%), while only int8 keeps a lookup's p99 under 15 ms with 10,000 entries. Activations are
             quantised per tensor, so a text's vector depends slightly on the texts batched with it: the cache
             embeds every query alone (and stores that same vector).
  onnx       ONNX Runtime, fp32: the same vectors as the PyTorch reference (cosine 1.0000), 2-3x faster than
             PyTorch here (torch's small fp32 matmuls are slow on this CPU).
  torch      the PyTorch reference in models/bert.py.
One thread by default, and pool threads never spin: the cores belong to the model between two lookups (with
spinning off, a second thread measured no faster).

The ONNX files are exported once from the packaged weights into <cache_dir>/embedder/<name>/, atomically (a
crash leaves no half file); later starts only load them. Exporting needs torch; running them does not.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

MODEL_NAME = "all-minilm-l6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
BATCH = 32


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], unit rows. Synchronous and CPU-bound: async callers use a thread."""
        ...

    def fits(self, text: str) -> bool:
        """Whether the model reads all of `text`: it reads the first MAX_TOKENS tokens of a longer one only."""
        ...


class OnnxEmbedder:
    """ONNX Runtime session over the exported graph; thread-safe (ORT sessions are)."""

    def __init__(self, name: str, graph: Path, tokenizer_json: Path, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
        # idle pool threads sleep instead of spinning: the cores belong to the model between two lookups
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._counter = Tokenizer.from_file(str(tokenizer_json))  # the same, without truncation: for `fits`
        self._counter.no_truncation()  # (the file itself truncates to 128)
        self._counter.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.name = name
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), BATCH):
            encodings = self._tokenizer.encode_batch(texts[start : start + BATCH])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)  # [B, S]
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # [B, S]
            (vectors,) = self._session.run(None, {"ids": ids, "mask": mask})
            out[start : start + len(encodings)] = vectors
        return out

    def fits(self, text: str) -> bool:
        return len(self._counter.encode(text).ids) <= MAX_TOKENS


class TorchEmbedder:
    """The PyTorch reference (models/bert.py) behind the same protocol."""

    def __init__(self, threads: int) -> None:
        import torch

        from blink.models.bert import Embedder as Bert

        torch.set_num_threads(threads)
        self._model = Bert.load()
        self.name = "torch"
        self.dim = self._model.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._model.embed(texts)

    def fits(self, text: str) -> bool:
        return self._model.fits(text)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)  # another process writing the same file meanwhile wrote the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def onnx_files(cache_dir: Path, *, int8: bool) -> tuple[Path, Path]:
    """(graph, tokenizer.json) of the exported model, exporting it (and quantising it) first if needed."""
    from blink.models.bert import packaged_model

    source = packaged_model()
    size = (source / "model.safetensors").stat().st_size  # a different weights package is a different folder
    folder = cache_dir / "embedder" / f"{MODEL_NAME}-{size}"

    def export(tmp: Path) -> None:
        from blink.models.bert import export_onnx

        export_onnx(tmp, source)

    graph = _write_atomically(folder / "model.onnx", export)
    if int8:

        def quantize(tmp: Path) -> None:
            import logging

            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.disable(logging.WARNING)  # it advises "pre-processing" on the root logger, meant for CNNs
            try:
                quantize_dynamic(graph, tmp, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(logging.NOTSET)

        graph = _write_atomically(folder / "model-int8.onnx", quantize)
    return graph, source / "tokenizer.json"


def _onnx(int8: bool) -> Callable[[Path, int], Embedder]:
    def make(cache_dir: Path, threads: int) -> Embedder:
        graph, tokenizer = onnx_files(cache_dir, int8=int8)
        return OnnxEmbedder("onnx-int8" if int8 else "onnx", graph, tokenizer, threads)

    return make


EMBEDDERS: dict[str, Callable[[Path, int], Embedder]] = {
    "onnx": _onnx(False),
    "onnx-int8": _onnx(True),
    "torch": lambda cache_dir, threads: TorchEmbedder(threads),
}


def load_embedder(name: str, cache_dir: Path, threads: int = 1) -> Embedder:
    """The embedder `name` (a key of EMBEDDERS). ValueError for an unknown name; ModelNotFound when the model's
    package is not installed. The first call for an ONNX runtime exports the model (~10 s)."""
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
    return EMBEDDERS[name](cache_dir, threads)


class LazyEmbedder:
    """One embedder shared by the semantic cache and the document store, loaded on the first `load` or `embed`
    (thread-safe). `loaded()` never blocks: None until the load finished."""

    def __init__(self, name: str, cache_dir: Path, threads: int = 1) -> None:
        import threading

        if name not in EMBEDDERS:
            raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
        self.name, self._cache_dir, self._threads = name, cache_dir, threads
        self._lock = threading.Lock()
        self._embedder: Embedder | None = None

    def loaded(self) -> Embedder | None:
        return self._embedder

    def load(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = load_embedder(self.name, self._cache_dir, self._threads)
            return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        return (self._embedder or self.load()).embed(texts)

    def fits(self, text: str) -> bool:
        return (self._embedder or self.load()).fits(text)
