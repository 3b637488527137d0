"""The block manager: allocation, sharing by prefix, freeing, LRU eviction. Pure bookkeeping, no torch."""

from __future__ import annotations

import pytest

from blink.engine.kv_cache import BlockManager, CacheSalt

BS = 4


def filled(bm: BlockManager, rid: str, tokens: list[int], tenant: str | None = None) -> list[int]:
    """Allocate for `tokens` (sharing whatever prefix is cached in the tenant's partition), mark all computed;
    return the block table."""
    salt = bm.salt(tokens, tenant)
    prefix = bm.lookup(tokens, salt)
    assert bm.allocate(rid, len(tokens), prefix, salt)
    bm.commit(rid, tokens, len(tokens))
    return list(bm.table(rid))


def test_allocation_grows_by_whole_blocks_and_fails_without_side_effects() -> None:
    bm = BlockManager(3, BS)
    assert bm.allocate("a", 5)  # 2 blocks
    assert len(bm.table("a")) == 2 and bm.num_free_blocks == 1
    assert bm.allocate("a", 8)  # still 2 blocks
    assert len(bm.table("a")) == 2
    assert not bm.allocate("b", 9)  # 3 blocks: only 1 free
    assert bm.table("b") == [] and bm.num_free_blocks == 1
    bm.free("a")
    assert bm.num_free_blocks == 3


def test_a_shared_prefix_reuses_full_blocks_and_leaves_one_token_to_compute() -> None:
    bm = BlockManager(10, BS)
    system = list(range(100, 108))  # 2 full blocks
    a = filled(bm, "a", [*system, 1, 2, 3])
    hit = bm.lookup([*system, 7, 8])
    assert [b.block_id for b in hit] == a[:2]
    b = filled(bm, "b", [*system, 7, 8])
    assert b[:2] == a[:2] and b[2] not in a  # shared head, private tail
    assert all(bm.blocks[i].ref_count == 2 for i in a[:2])
    # a prompt that is exactly the cached blocks still computes its last token
    assert len(bm.lookup(system)) == 1


def test_same_tokens_after_a_different_prefix_never_match() -> None:
    bm = BlockManager(10, BS)
    filled(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.lookup([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []  # block 2's tokens equal, its parent differs
    assert len(bm.lookup([1, 2, 3, 4, 9, 9, 9, 9, 9])) == 1


def test_only_computed_full_blocks_are_registered() -> None:
    bm = BlockManager(10, BS)
    tokens = list(range(1, 11))
    assert bm.allocate("a", len(tokens))
    bm.commit("a", tokens, 6)  # 1 full block computed, the second half done
    assert bm.num_cached_blocks == 1
    assert len(bm.lookup([*tokens, 0])) == 1
    bm.commit("a", tokens, 10)
    assert len(bm.lookup([*tokens, 0])) == 2


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    filled(bm, "old", [1, 1, 1, 1, 2])
    filled(bm, "new", [3, 3, 3, 3, 4])
    bm.free("old")
    bm.free("new")
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # both partial tail blocks (unregistered) and then the least recently freed cached block go first
    assert bm.allocate("x", 3 * BS)
    assert bm.lookup([3, 3, 3, 3, 0]) != [] and bm.lookup([1, 1, 1, 1, 0]) == []
    bm.free("x")


def test_a_cached_free_block_taken_by_lookup_leaves_the_free_queue() -> None:
    bm = BlockManager(2, BS)
    filled(bm, "a", [5, 5, 5, 5, 6])
    bm.free("a")
    prefix = bm.lookup([5, 5, 5, 5, 7])
    assert bm.allocate("b", 5, prefix)
    assert bm.num_free_blocks == 0
    assert not bm.allocate("c", 1)  # the shared block is not handed out again
    bm.free("b")
    assert bm.num_free_blocks == 2


def test_eviction_unregisters_and_a_reused_block_never_matches_its_old_content() -> None:
    bm = BlockManager(2, BS)
    filled(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    bm.free("a")
    filled(bm, "b", [9, 9, 9, 9, 9, 9, 9, 9])  # evicts both of a's blocks
    bm.free("b")
    assert bm.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]) == []
    assert len(bm.lookup([9, 9, 9, 9, 9, 9, 9, 9, 0])) == 2


def test_duplicate_content_computed_twice_keeps_one_registration() -> None:
    bm = BlockManager(6, BS)
    tokens = [4, 4, 4, 4, 5, 5, 5, 5, 6]
    assert bm.allocate("a", 9) and bm.allocate("b", 9)  # both miss: nothing was committed yet
    bm.commit("a", tokens, 9)
    bm.commit("b", tokens, 9)
    assert bm.num_cached_blocks == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 6
    assert len(bm.lookup(tokens)) == 2


def test_double_free_is_harmless_and_bad_sizes_are_rejected() -> None:
    bm = BlockManager(2, BS)
    assert bm.allocate("a", 1)
    bm.free("a")
    bm.free("a")
    assert bm.num_free_blocks == 2
    with pytest.raises(ValueError):
        BlockManager(0, BS)


def test_prefix_caching_off_shares_nothing() -> None:
    bm = BlockManager(4, BS, prefix_caching=False)
    filled(bm, "a", [1, 2, 3, 4, 5])
    assert bm.lookup([1, 2, 3, 4, 5]) == [] and bm.num_cached_blocks == 0


def test_the_same_tokens_under_two_tenants_share_nothing() -> None:
    bm = BlockManager(10, BS)
    tokens = list(range(1, 10))  # 2 full blocks
    a = filled(bm, "a", tokens, "tenant-a")
    assert bm.lookup(tokens, bm.salt(tokens, "tenant-b")) == []
    assert bm.lookup(tokens) == []  # nor does a request without a tenant (unsalted) find them
    b = filled(bm, "b", tokens, "tenant-b")
    assert not set(a) & set(b)  # B computed its own copy
    assert [blk.block_id for blk in bm.lookup(tokens, bm.salt(tokens, "tenant-a"))] == a[:2]
    assert [blk.block_id for blk in bm.lookup(tokens, bm.salt(tokens, "tenant-b"))] == b[:2]


def test_a_tenant_finds_its_own_blocks_again() -> None:
    bm = BlockManager(10, BS)
    first = filled(bm, "a1", [*range(1, 9), 50], "tenant-a")
    bm.free("a1")
    again = filled(bm, "a2", [*range(1, 9), 60], "tenant-a")
    assert again[:2] == first[:2]


def test_a_declared_shared_prefix_is_shared_across_tenants_and_the_block_after_it_is_not() -> None:
    system = list(range(100, 110))  # 10 tokens: 2 whole blocks shared, its last 2 tokens in a salted block
    bm = BlockManager(20, BS, shared_prefixes=[system])
    assert bm.salt([*system, 1, 2], "tenant-a") == CacheSalt("tenant-a", 2)
    assert bm.salt([*system[:9], 1, 2, 3], "tenant-a") == CacheSalt("tenant-a", 0)  # not the whole shared prefix
    assert bm.salt(system[:9], "tenant-a") == CacheSalt("tenant-a", 2)  # a beginning of it (a pre-load cut short)
    assert bm.salt([*system, 1, 2], None) == CacheSalt()
    tail = [1, 2, 3, 4, 5, 6]  # with system's last 2 tokens: the third and fourth blocks
    a = filled(bm, "a", [*system, *tail, 9], "tenant-a")
    prompt_b = [*system, *tail, 8]
    hit = bm.lookup(prompt_b, bm.salt(prompt_b, "tenant-b"))
    assert [blk.block_id for blk in hit] == a[:2]  # the shared blocks only, not the third (same tokens, salted)
    b = filled(bm, "b", prompt_b, "tenant-b")
    assert b[:2] == a[:2] and not set(b[2:]) & set(a)
    assert len(bm.lookup(prompt_b, bm.salt(prompt_b, "tenant-a"))) == 4  # A's own chain is intact
