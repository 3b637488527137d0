"""Chunking, the in-memory context store and the context block, with a hashing embedder standing in for the model."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from blink.errors import InvalidRequest, RequestTooLarge
from blink.preload.store import Chunk, MemoryContextStore, ScoredChunk, chunk_text, context_block
from tests.unit.preload.fakes import HashEmbedder

CATS = "Cats purr when they are content. A cat sleeps most of the day.\n\nKittens play with yarn and chase mice."
STOCKS = "The stock market fell as interest rates rose. Investors sold bonds and shares."


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# chunking


def test_a_short_text_is_one_chunk_with_its_whitespace_collapsed() -> None:
    assert chunk_text("d", "  Hello   there.\tGeneral  Kenobi! ") == [Chunk("d", 0, "Hello there. General Kenobi!")]


def test_paragraphs_are_never_merged() -> None:
    chunks = chunk_text("cats", CATS)
    assert [c.text for c in chunks] == [
        "Cats purr when they are content. A cat sleeps most of the day.",
        "Kittens play with yarn and chase mice.",
    ]
    assert [(c.document_id, c.index) for c in chunks] == [("cats", 0), ("cats", 1)]


def test_sentences_are_packed_up_to_the_word_limit() -> None:
    text = " ".join(words(50, t) + "." for t in "abc")  # three sentences of 50 words
    assert [len(c.text.split()) for c in chunk_text("d", text)] == [100, 50]
    assert [len(c.text.split()) for c in chunk_text("d", text, max_words=50)] == [50, 50, 50]


def test_a_sentence_over_the_limit_is_cut_by_words_after_the_pending_ones() -> None:
    text = f"Short one. {words(300, 'w')}. Tail sentence."
    chunks = chunk_text("d", text)
    assert [len(c.text.split()) for c in chunks] == [2, 120, 120, 62]
    assert chunks[0].text == "Short one." and chunks[-1].text.endswith("w299. Tail sentence.")


def test_chunks_keep_every_word_in_order_and_none_is_empty() -> None:
    text = "\n\n".join(f"{words(n, f'p{n}_')}. Second sentence here!" for n in (3, 130, 250, 119)) + "\n\n \n\n"
    chunks = chunk_text("d", text)
    assert [w for c in chunks for w in c.text.split()] == text.split()
    assert all(0 < len(c.text.split()) <= 120 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunk_text("d", text) == chunks
    assert chunk_text("d", " \n\n\t ") == []


# the store


def test_put_get_list_delete() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder())
        metadata: dict[str, str | int | float | bool] = {"lang": "en", "page": 3}
        cats = await store.put("cats", CATS, metadata)
        metadata["page"] = 4  # the store keeps its own copy
        assert cats.id == "cats" and cats.text == CATS and cats.metadata == {"lang": "en", "page": 3}
        assert cats.chunks == chunk_text("cats", CATS) and cats.created > 0
        await store.put("stocks", STOCKS, {})
        assert await store.get("cats") == cats and await store.get("dogs") is None
        assert [d.id for d in await store.list()] == ["cats", "stocks"]
        assert await store.delete("cats") is True and await store.delete("cats") is False
        assert await store.get("cats") is None and [d.id for d in await store.list()] == ["stocks"]

    asyncio.run(main())


def test_putting_an_existing_id_replaces_the_document() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder())
        await store.put("a", CATS, {"v": 1})
        await store.put("b", "Something else entirely.", {})
        await store.put("a", STOCKS, {"v": 2})
        replaced = await store.get("a")
        assert replaced is not None and replaced.text == STOCKS and replaced.metadata == {"v": 2}
        assert [d.id for d in await store.list()] == ["b", "a"]
        found = await store.search("cats kittens purr yarn", top_k=10)
        assert {s.chunk.text for s in found}.isdisjoint(chunk_text("a", CATS))
        assert all(s.chunk.text in (STOCKS, "Something else entirely.") for s in found)

    asyncio.run(main())


def test_search_ranks_chunks_best_first() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder())
        await store.put("cats", CATS, {})
        await store.put("stocks", STOCKS, {})
        found = await store.search("kittens chase mice and play", top_k=2)
        assert found[0].chunk == Chunk("cats", 1, "Kittens play with yarn and chase mice.")
        assert len(found) == 2 and found[0].score > found[1].score
        everything = await store.search("investors sold shares", top_k=10)
        assert len(everything) == 3 and everything[0].chunk.document_id == "stocks"
        assert [s.score for s in everything] == sorted((s.score for s in everything), reverse=True)
        assert 0.99 < (await store.search("kittens play with yarn and chase mice", top_k=1))[0].score <= 1.0 + 1e-6

    asyncio.run(main())


def test_search_is_restricted_to_the_given_documents() -> None:
    async def main() -> None:
        embed = HashEmbedder()
        store = MemoryContextStore(embed)
        await store.put("cats", CATS, {})
        await store.put("stocks", STOCKS, {})
        found = await store.search("kittens chase mice", top_k=5, document_ids=["stocks", "unknown"])
        assert [s.chunk.document_id for s in found] == ["stocks"]
        calls = len(embed.calls)
        assert await store.search("kittens", top_k=5, document_ids=["unknown"]) == []
        assert await store.search("kittens", top_k=5, document_ids=[]) == []
        assert len(embed.calls) == calls  # nothing to rank: the query was not embedded
        with pytest.raises(ValueError, match="top_k"):
            await store.search("kittens", top_k=0)

    asyncio.run(main())


def test_embedding_runs_off_the_event_loop_thread() -> None:
    async def main() -> None:
        embed = HashEmbedder()
        store = MemoryContextStore(embed)
        await store.put("cats", CATS, {})
        await store.search("cats", top_k=1)
        assert embed.calls == [[c.text for c in chunk_text("cats", CATS)], ["cats"]]
        assert threading.get_ident() not in embed.threads

    asyncio.run(main())


def test_a_document_over_the_byte_limit_is_413_and_an_empty_one_400() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder(), max_document_bytes=10)
        await store.put("fits", "ééééé", {})  # 5 characters, 10 bytes of UTF-8
        with pytest.raises(RequestTooLarge) as err:
            await store.put("big", "éééééé", {})
        assert err.value.status == 413 and err.value.param == "text"
        with pytest.raises(InvalidRequest) as empty:
            await store.put("empty", " \n\n ", {})
        assert empty.value.status == 400 and empty.value.param == "text"
        assert [d.id for d in await store.list()] == ["fits"]

    asyncio.run(main())


def test_a_full_store_refuses_new_documents_but_replaces_existing_ones() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder(), max_documents=2)
        await store.put("a", CATS, {})
        await store.put("b", STOCKS, {})
        with pytest.raises(InvalidRequest, match="full") as err:
            await store.put("c", CATS, {})
        assert err.value.status == 400
        await store.put("a", STOCKS, {})
        assert await store.delete("b")
        await store.put("c", CATS, {})
        assert [d.id for d in await store.list()] == ["a", "c"]

    asyncio.run(main())


def test_concurrent_puts_cannot_overfill_the_store() -> None:
    async def main() -> None:
        store = MemoryContextStore(HashEmbedder(), max_documents=1)
        results = await asyncio.gather(store.put("a", CATS, {}), store.put("b", STOCKS, {}), return_exceptions=True)
        assert sum(isinstance(r, InvalidRequest) for r in results) == 1
        assert len(await store.list()) == 1

    asyncio.run(main())


# the context block


def test_context_block_orders_by_document_then_chunk_whatever_the_scores() -> None:
    chunks = [
        ScoredChunk(Chunk("b", 0, "B zero"), 0.9),
        ScoredChunk(Chunk("a", 2, "A two"), 0.8),
        ScoredChunk(Chunk("a", 10, "A ten"), 0.7),
        ScoredChunk(Chunk("a", 2, "A two"), 0.8),  # a duplicate renders once
    ]
    expected = "[a #2]\nA two\n\n[a #10]\nA ten\n\n[b #0]\nB zero"
    for order in itertools.permutations(chunks):
        assert context_block(list(order)) == expected
    assert context_block([]) == ""
