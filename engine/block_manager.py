"""KV block ownership: ref counts, the block-hash prefix cache and its LRU eviction."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.block_hash import hash_block
from engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept with the hash so a hit is verified, not trusted


@dataclass(slots=True)
class KVEvents:
    """Net change of the set of cached block hashes since the last drain.

    A hash stored and evicted within one window cancels out, so the two lists never share a
    hash and may be applied in either order.
    """

    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)


class BlockManager:
    """Hands out KV blocks to sequences and keeps freed full blocks as a prefix cache.

    Every block is in exactly one state: in use (ref_count > 0), cached (ref_count 0, hashed,
    in `_cached` in LRU order) or free (ref_count 0, no hash, in `_free`). A block's hash is
    published only once its K/V have been computed, so a hit always reads finished data.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # first = least recently used
        self._hash_to_block: dict[int, int] = {}
        self._stored: dict[int, None] = {}
        self._evicted: dict[int, None] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - self.num_free_blocks

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of `seq`'s longest cached prefix; return how many tokens that covers.

        The last token is never served from the cache: its logits are needed to sample.
        """
        assert not seq.block_table, "prefix lookup is only for a sequence without blocks"
        bs = self.block_size
        parent: int | None = None
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            h = hash_block(parent, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        return len(seq.block_table) * bs

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False, changing nothing, if blocks run out."""
        num_needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if num_needed <= 0:
            return True
        if num_needed > len(self._free) + len(self._cached):
            return False
        for _ in range(num_needed):
            seq.block_table.append(self._take_block())
        return True

    def max_allocatable_tokens(self, seq: Sequence) -> int:
        """How many tokens `seq` could hold if it took every free block."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of `seq`'s blocks that are now full and computed (known tokens only: a pending
        token is never computed yet)."""
        assert seq.num_computed_tokens <= len(seq.token_ids), "a computed token is still pending"
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < seq.num_computed_tokens // bs:
            i = len(hashes)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            if h not in self._hash_to_block:  # else another block already holds this prefix
                block = self.blocks[seq.block_table[i]]
                block.hash, block.token_ids = h, tokens
                self._hash_to_block[h] = block.block_id
                self._record_stored(h)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; full blocks stay cached, tail blocks first in eviction order."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than referenced"
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._cached[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def take_events(self) -> KVEvents:
        """Drain the net stored/evicted hashes since the last call."""
        events = KVEvents(stored=list(self._stored), evicted=list(self._evicted))
        self._stored.clear()
        self._evicted.clear()
        return events

    def cached_hashes(self) -> list[int]:
        """Every hash whose block is resident (in use or cached): a snapshot for a consumer's resync."""
        return list(self._hash_to_block)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]
        block.ref_count += 1

    def _take_block(self) -> int:
        """A block for new data: a free one if any, else evict the least recently used cached one."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)
            block = self.blocks[block_id]
            assert block.hash is not None
            del self._hash_to_block[block.hash]
            self._record_evicted(block.hash)
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _record_stored(self, h: int) -> None:
        if h in self._evicted:
            del self._evicted[h]
        else:
            self._stored[h] = None

    def _record_evicted(self, h: int) -> None:
        if h in self._stored:
            del self._stored[h]
        else:
            self._evicted[h] = None
