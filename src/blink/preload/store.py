"""The context store: documents a session opens (`context.open`), chunked, embedded, and searched by meaning.

Documents are split into chunks of whole sentences (paragraphs are never merged), each chunk embedded once at
`put`; `search` embeds the query and ranks chunks by cosine (the embedder returns unit rows, so a dot product).
Embedding is slow and synchronous, so it always runs in a thread: the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import builtins
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blink.errors import InvalidRequest, RequestTooLarge

Metadata = dict[str, str | int | float | bool]
Embed = Callable[[list[str]], np.ndarray]  # texts → float32 [len(texts), dim], unit rows

MAX_CHUNK_WORDS = 120
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


@dataclass(frozen=True)
class Chunk:
    document_id: str
    index: int  # position in its document, from 0
    text: str


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: Metadata
    chunks: list[Chunk]
    created: int  # unix seconds of the put that stored this version


@dataclass(frozen=True)
class ScoredChunk:
    chunk: Chunk
    score: float  # cosine similarity to the query, in [-1, 1]


def _pack(sentences: list[str], max_words: int) -> list[str]:
    """Consecutive sentences joined into pieces of at most `max_words` words; a longer sentence alone is cut
    into `max_words`-word pieces."""
    pieces: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        words = sentence.split()
        if len(current) + len(words) > max_words and current:
            pieces.append(" ".join(current))
            current = []
        while len(words) > max_words:
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        current += words
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk_text(document_id: str, text: str, max_words: int = MAX_CHUNK_WORDS) -> list[Chunk]:
    """Deterministic chunks of `text`: within each paragraph (blank-line separated), whole sentences packed up to
    `max_words` words. Whitespace inside a chunk is collapsed to single spaces; no chunk is empty, and only a
    text with no words at all has no chunks."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        pieces += _pack(_SENTENCE_END.split(paragraph.strip()), max_words)
    return [Chunk(document_id, i, piece) for i, piece in enumerate(pieces)]


def context_block(chunks: Sequence[ScoredChunk]) -> str:
    """Retrieved chunks as text for a system prompt, ordered by (document id, chunk index) and not by score: the
    same set of chunks always renders to the same bytes, so the KV prefix cache can reuse its prefill."""
    unique = {(s.chunk.document_id, s.chunk.index): s.chunk for s in chunks}
    return "\n\n".join(f"[{c.document_id} #{c.index}]\n{c.text}" for _, c in sorted(unique.items()))


class ContextStore(Protocol):
    async def put(self, doc_id: str, text: str, metadata: Metadata) -> Document:
        """Store (or replace) a document. Raises RequestTooLarge over the size limit, InvalidRequest for an empty
        text or when the store is full."""
        ...

    async def get(self, doc_id: str) -> Document | None: ...

    async def delete(self, doc_id: str) -> bool:
        """True when the document existed."""
        ...

    async def search(self, query: str, top_k: int, document_ids: Sequence[str] | None = None) -> list[ScoredChunk]:
        """The `top_k` chunks most similar to `query`, best first, from `document_ids` only when given (unknown
        ids contribute nothing) or from every document."""
        ...

    async def list(self) -> builtins.list[Document]:
        """Every document, least recently put first."""
        ...

    def limit(self, max_documents: int, max_total_bytes: int) -> None:
        """Hold at most this many documents and bytes of text (0: no limit) from now on (kept ones stay)."""
        ...


class MemoryContextStore:
    """The in-process ContextStore: documents in a dict, each with its chunk embeddings as one matrix.

    Each stored (document, matrix) pair is replaced, never mutated, so a search that awaits its query embedding
    ranks a consistent snapshot even while documents change."""

    def __init__(
        self, embed: Embed, *, max_document_bytes: int = 1 << 20, max_documents: int = 1000, max_total_bytes: int = 0
    ) -> None:
        self._embed = embed
        self.max_document_bytes = max_document_bytes
        self.max_documents = max_documents  # 0: no limit
        self.max_total_bytes = max_total_bytes  # of all documents' text; 0: no limit
        self._docs: dict[str, tuple[Document, np.ndarray]] = {}  # id → (document, [chunks, dim] float32)

    def _check_room(self, doc_id: str, size: int) -> None:
        if doc_id not in self._docs and 0 < self.max_documents <= len(self._docs):
            raise InvalidRequest(f"the context store is full ({self.max_documents} documents); delete one first")
        kept = sum(len(d.text.encode()) for i, (d, _) in self._docs.items() if i != doc_id)
        if self.max_total_bytes and kept + size > self.max_total_bytes:
            raise InvalidRequest(
                f"the context store is full: its documents would hold {kept + size} bytes, over its "
                f"{self.max_total_bytes}; delete some first"
            )

    async def put(self, doc_id: str, text: str, metadata: Metadata) -> Document:
        size = len(text.encode())
        if size > self.max_document_bytes:
            raise RequestTooLarge(
                f"the document is {size} bytes, over the limit of {self.max_document_bytes}", param="text"
            )
        chunks = chunk_text(doc_id, text)
        if not chunks:
            raise InvalidRequest("the document's text is empty", param="text")
        self._check_room(doc_id, size)  # before the slow embedding, and again after it: other puts ran meanwhile
        vectors = np.asarray(await asyncio.to_thread(self._embed, [c.text for c in chunks]), dtype=np.float32)
        assert vectors.ndim == 2 and len(vectors) == len(chunks), f"embed returned {vectors.shape}"
        self._check_room(doc_id, size)
        document = Document(doc_id, text, dict(metadata), chunks, int(time.time()))
        self._docs.pop(doc_id, None)  # a replaced document moves to the end of `list`
        self._docs[doc_id] = (document, vectors)
        return document

    async def get(self, doc_id: str) -> Document | None:
        entry = self._docs.get(doc_id)
        return entry[0] if entry else None

    async def delete(self, doc_id: str) -> bool:
        return self._docs.pop(doc_id, None) is not None

    async def search(self, query: str, top_k: int, document_ids: Sequence[str] | None = None) -> list[ScoredChunk]:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        ids = self._docs if document_ids is None else dict.fromkeys(document_ids)
        entries = [self._docs[i] for i in ids if i in self._docs]
        if not entries:
            return []  # nothing to rank: skip the slow query embedding
        query_vector = (await asyncio.to_thread(self._embed, [query]))[0]  # [dim]
        scores = np.concatenate([vectors @ query_vector for _, vectors in entries])  # [total chunks]
        chunks = [c for document, _ in entries for c in document.chunks]
        best = np.argsort(-scores, kind="stable")[:top_k]  # ties keep document then chunk order: deterministic
        return [ScoredChunk(chunks[i], float(scores[i])) for i in best]

    async def list(self) -> builtins.list[Document]:
        return [document for document, _ in self._docs.values()]

    def limit(self, max_documents: int, max_total_bytes: int) -> None:
        self.max_documents, self.max_total_bytes = max_documents, max_total_bytes


class TenantStores:
    """One ContextStore per tenant, made by `make()` at the tenant's first use: a tenant's documents are invisible
    to every other one (listing, reading, replacing, deleting, `context.open`, retrieval). `of` applies the
    tenant's current limits (a keys file may change them) to its store."""

    def __init__(self, make: Callable[[], ContextStore]) -> None:
        self._make = make
        self._stores: dict[str, ContextStore] = {}

    def of(self, tenant: str, max_documents: int = 0, max_total_bytes: int = 0) -> ContextStore:
        store = self._stores.get(tenant)
        if store is None:
            store = self._stores[tenant] = self._make()
        store.limit(max_documents, max_total_bytes)
        return store
