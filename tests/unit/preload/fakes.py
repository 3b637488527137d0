"""A fast, deterministic stand-in for the sentence embedder, for tests of the logic around embeddings."""

from __future__ import annotations

import re
import threading
import zlib

import numpy as np

DIM = 64


class HashEmbedder:
    """Bag of words hashed into 64 dimensions, rows normalised: texts sharing words are similar, and a text's
    vector depends on nothing else. Records each call's texts and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.threads: set[int] = set()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.threads.add(threading.get_ident())
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, zlib.crc32(word.encode()) % DIM] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
