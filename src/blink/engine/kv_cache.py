"""Paged KV cache bookkeeping with automatic prefix caching. No torch here: the runner owns the tensors.

The runner's KV tensors hold `num_blocks` blocks of `block_size` token positions each. A sequence owns a block
table (a list of block ids): its position p lives in block `table[p // block_size]` at offset `p % block_size`.

Prefix caching. Once a block is full and its K/V are computed, `commit` registers it under the key
`(serial of the block before it, salt, its token ids)`. The key holds the tokens themselves, not a digest of them, so
two different prefixes can never share a block: collisions are impossible by construction. Each registration gets a
fresh serial that is never reused, so a key naming an evicted parent matches nothing new. A request whose prompt
starts with a registered chain (same system prompt, earlier turns) shares those blocks and prefills the rest.

Tenants. The salt partitions the cache (as vLLM's `cache_salt`, CVE-2025-46570): a block is keyed with its
request's tenant, so a lookup for another tenant never finds it, nor learns from its timing that it exists. The
one exception is declared by the operator: the whole blocks of a shared prefix (`shared_prefixes`, system prompts
shared on purpose) that a prompt starts with are keyed unsalted (salt None), as are all blocks of requests with no
tenant (an open server's single tenant): a server with tenants leaves that partition to the declared prefixes.
`salt` computes a request's `CacheSalt` from its prompt once; `lookup` and `allocate` take it, and `commit` keys
with the one its table was allocated with.

Free blocks, registered or not, wait in one LRU queue: allocation takes the oldest first (evicting its
registration); a freed registered block joins the back (kept as long as possible), a freed unregistered one
the front (nothing in it is worth keeping). A registered free block found by `lookup` leaves the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BlockKey = tuple[int, str | None, tuple[int, ...]]  # (parent serial, salt, tokens)


@dataclass(frozen=True)
class CacheSalt:
    """The prefix-cache partition of one request's blocks: its `tenant` (None: unsalted, shared by every request
    without a tenant), except its first `shared_blocks` blocks, an operator-declared shared prefix (unsalted)."""

    tenant: str | None = None
    shared_blocks: int = 0

    def of_block(self, index: int) -> str | None:
        return None if index < self.shared_blocks else self.tenant


UNSALTED = CacheSalt()


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None
    serial: int = 0  # 0: not registered in the prefix cache
    speculative: bool = False  # registered by background work (a pre-load) and not yet reused by a live request


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    committed: int = 0  # leading blocks already registered (or known duplicates of registered ones)
    parent: int = 0  # serial that keys the next block to register
    salt: CacheSalt = UNSALTED


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        shared_prefixes: Iterable[Sequence[int]] = (),
    ) -> None:
        """`shared_prefixes`: token sequences (system prompts) whose whole blocks every tenant may share."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.shared_prefixes = [tuple(p) for p in shared_prefixes if len(p) >= block_size]
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._registry: dict[BlockKey, Block] = {}
        self._tables: dict[str, _Table] = {}
        self._next_serial = 1

    # state --------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including registered ones nobody references)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._registry)

    def table(self, request_id: str) -> list[int]:
        return self._tables[request_id].blocks if request_id in self._tables else []

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # prefix cache -------------------------------------------------------------------------------------
    def salt(self, prompt: Sequence[int], tenant: str | None) -> CacheSalt:
        """The partition of a request of `tenant` with this prompt: its tenant's, after the whole blocks that lie
        inside a declared shared prefix, of a prompt that starts with it or that is a beginning of it (a pre-load
        cut short): those hold nothing but the operator's declared text."""
        if tenant is None:
            return UNSALTED
        shared = 0
        for p in self.shared_prefixes:
            n = min(len(p), len(prompt))
            if tuple(prompt[:n]) == p[:n]:
                shared = max(shared, n // self.block_size)
        return CacheSalt(tenant, shared)

    def lookup(self, token_ids: Sequence[int], salt: CacheSalt = UNSALTED) -> list[Block]:
        """The longest registered chain of full blocks in `salt`'s partition that starts `token_ids`, leaving at
        least one token uncached (its logits are needed). Takes no references: pass the result to `allocate`."""
        if not self.prefix_caching:
            return []
        found: list[Block] = []
        parent, bs = 0, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            block = self._registry.get((parent, salt.of_block(i), tuple(token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            found.append(block)
            parent = block.serial
        return found

    # allocation ---------------------------------------------------------------------------------------
    def can_allocate(self, request_id: str, num_tokens: int, prefix: Sequence[Block] = ()) -> bool:
        table = self._tables.get(request_id)
        have = len(table.blocks) if table else 0
        need = self.blocks_for(num_tokens) - have - len(prefix)
        return max(need, 0) + sum(1 for b in prefix if b.ref_count == 0) <= len(self._free)

    def allocate(
        self, request_id: str, num_tokens: int, prefix: Sequence[Block] = (), salt: CacheSalt = UNSALTED
    ) -> bool:
        """Grow the request's table to hold `num_tokens` positions, first sharing `prefix` (from `lookup` with the
        same `salt`, only when the table is new). A new table's blocks are committed in `salt`'s partition.
        Returns False and changes nothing if there are not enough free blocks."""
        if not self.can_allocate(request_id, num_tokens, prefix):
            return False
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = _Table(salt=salt)
        assert not prefix or not table.blocks, "a prefix is shared only into a new table"
        for block in prefix:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1
            table.blocks.append(block.block_id)
        if prefix:
            table.committed, table.parent = len(prefix), prefix[-1].serial
        while len(table.blocks) < self.blocks_for(num_tokens):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._unregister(block)
            block.ref_count = 1
            table.blocks.append(block_id)
        return True

    def commit(
        self, request_id: str, token_ids: Sequence[int], num_computed: int, *, speculative: bool = False
    ) -> None:
        """Register the request's full blocks among its first `num_computed` tokens, whose K/V are now computed.
        `token_ids` are the request's tokens (prompt + output) from position 0. `speculative`: background work
        computed them (see `claim`)."""
        table = self._tables.get(request_id)
        if table is None or not self.prefix_caching:
            return
        bs = self.block_size
        while table.committed < min(num_computed // bs, len(table.blocks)):
            i = table.committed
            block = self.blocks[table.blocks[i]]
            key = (table.parent, table.salt.of_block(i), tuple(token_ids[i * bs : (i + 1) * bs]))
            twin = self._registry.get(key)
            if twin is None:
                block.key, block.serial, block.speculative = key, self._next_serial, speculative
                self._next_serial += 1
                self._registry[key] = block
                twin = block
            # else: the same content was computed by another request first; this copy stays private
            table.parent = twin.serial
            table.committed += 1

    def free(self, request_id: str) -> None:
        """Drop the request's references. Unreferenced blocks become free; registered ones stay findable."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.blocks):  # a sequence's tail is evicted before its (more shared) head
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.serial == 0:
                    self._free.move_to_end(block_id, last=False)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Shrink the request's table to the blocks `num_tokens` positions need (speculative decoding returns the
        blocks of rejected guesses). The dropped blocks were never registered: only computed positions are."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = max(self.blocks_for(num_tokens), table.committed)
        while len(table.blocks) > keep:
            block = self.blocks[table.blocks.pop()]
            assert block.ref_count == 1 and block.serial == 0, "only a sequence's private tail is trimmed"
            block.ref_count = 0
            self._free[block.block_id] = None
            self._free.move_to_end(block.block_id, last=False)

    @staticmethod
    def claim(prefix: Sequence[Block]) -> int:
        """A live request reuses `prefix`: count (once) the blocks background work computed for it."""
        claimed = 0
        for block in prefix:
            if block.speculative:
                block.speculative = False
                claimed += 1
        return claimed

    def _unregister(self, block: Block) -> None:
        if block.key is not None:
            del self._registry[block.key]
            block.key, block.serial, block.speculative = None, 0, False
