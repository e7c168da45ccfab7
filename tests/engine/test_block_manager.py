"""BlockManager: allocation order, ref counts, prefix-cache hits, exact LRU eviction and KV events."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.block_hash import hash_block, hash_blocks
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4  # block size of every test here
_ids = itertools.count()


def make_seq(token_ids: list[int] | range) -> Sequence:
    """A fresh waiting request whose prompt is `token_ids`."""
    n = next(_ids)
    tokens = list(token_ids)
    return Sequence(
        request_id=f"r{n}", arrival=n, token_ids=tokens, num_prompt_tokens=len(tokens),
        params=SamplingParams(), seed=0,
    )


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Give `seq` its cached prefix and blocks for all its tokens, 'compute' them, publish its full blocks."""
    seq.num_computed_tokens = bm.allocate_cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def assert_consistent(bm: BlockManager) -> None:
    """Each block is in exactly one state: in use, cached (hashed, LRU) or free (unhashed)."""
    free, cached = set(bm._free), set(bm._cached)
    assert len(free) == len(bm._free) and not free & cached
    for block in bm.blocks:
        if block.ref_count > 0:
            assert block.block_id not in free | cached
        elif block.block_id in cached:
            assert block.hash is not None and bm._hash_to_block[block.hash] == block.block_id
        else:
            assert block.block_id in free and block.hash is None and block.token_ids == ()
    assert {bm.blocks[b].hash for b in bm._hash_to_block.values()} == set(bm._hash_to_block)


def assert_all_released(bm: BlockManager) -> None:
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_used_blocks == 0
    assert_consistent(bm)


# ---- allocation and free -------------------------------------------------------------------


def test_allocate_takes_free_blocks_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(range(10)), make_seq(range(5))
    assert bm.allocate(a, 10)
    assert bm.allocate(b, 5)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4]
    assert [block.ref_count for block in bm.blocks] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3 and bm.num_used_blocks == 5
    assert_consistent(bm)


def test_allocate_grows_only_when_needed() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(4))
    assert bm.allocate(seq, 4)
    assert bm.allocate(seq, 3)  # already holds enough
    assert seq.block_table == [0]
    assert bm.allocate(seq, 5)
    assert seq.block_table == [0, 1]


def test_allocate_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = make_seq(range(8)), make_seq(range(12))
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 12)
    assert b.block_table == []
    assert bm.num_free_blocks == 2
    assert bm.max_allocatable_tokens(b) == 8
    assert bm.max_allocatable_tokens(a) == 16


def test_free_caches_hashed_blocks_and_returns_unhashed_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))  # blocks 0, 1 full; block 2 partial
    compute(bm, seq)
    assert [bm.blocks[i].hash for i in seq.block_table] == hash_blocks(range(10), BS) + [None]
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == []
    assert list(bm._free) == [3, 4, 5, 6, 7, 2]
    assert list(bm._cached) == [1, 0]  # tail block first in eviction order
    assert bm.num_free_blocks == 8
    assert_all_released(bm)
    taker = make_seq(range(100, 132))
    assert bm.allocate(taker, 32)
    assert taker.block_table == [3, 4, 5, 6, 7, 2, 1, 0]  # free blocks first, then the LRU cached ones


def test_commit_publishes_only_full_computed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(12))
    assert bm.allocate(seq, 12)
    seq.num_computed_tokens = 7
    bm.commit(seq)
    assert seq.block_hashes == hash_blocks(range(4), BS)
    assert bm.take_events().stored == seq.block_hashes
    seq.num_computed_tokens = 12
    bm.commit(seq)
    assert seq.block_hashes == hash_blocks(range(12), BS)
    assert bm.take_events().stored == seq.block_hashes[1:]
    assert bm.blocks[seq.block_table[2]].token_ids == (8, 9, 10, 11)


# ---- prefix cache ----------------------------------------------------------------------------


def test_shared_prefix_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    prefix = list(range(8))
    a, b = make_seq(prefix + [50]), make_seq(prefix + [60, 61])
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    assert bm.allocate_cached_prefix(b) == 8
    assert b.block_table == [0, 1]
    assert b.block_hashes == a.block_hashes == hash_blocks(prefix, BS)
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [2, 2, 1]
    assert bm.allocate(b, b.num_tokens)
    assert b.block_table == [0, 1, 3]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert list(bm._cached) == []  # shared blocks are still in use
    assert list(bm._free) == [4, 5, 6, 7, 2]
    bm.free(b)
    assert list(bm._cached) == [1, 0]
    assert_all_released(bm)


def test_hit_on_a_cached_block_takes_it_out_of_the_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq(list(range(8)) + [9])
    assert bm.allocate_cached_prefix(b) == 8
    assert list(bm._cached) == []
    assert bm.num_free_blocks == 2 and bm.blocks[0].ref_count == 1


@pytest.mark.parametrize(
    ("num_tokens", "num_hit_tokens"),
    [(1, 0), (4, 0), (5, 4), (8, 4), (11, 8), (12, 8), (13, 12), (20, 16), (21, 20), (30, 20)],
)
def test_cached_prefix_never_covers_the_last_token(num_tokens: int, num_hit_tokens: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(20))  # all of it cached once computed
    compute(bm, a)
    bm.free(a)
    b = make_seq(range(num_tokens))
    assert bm.allocate_cached_prefix(b) == num_hit_tokens
    assert b.block_table == list(range(num_hit_tokens // BS))
    assert b.block_hashes == hash_blocks(range(num_hit_tokens), BS)


def test_prompt_of_exactly_k_full_blocks_hits_k_minus_1() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(12))
    compute(bm, a)
    bm.free(a)
    b = make_seq(range(12))
    assert bm.allocate_cached_prefix(b) == 8
    assert b.block_table == [0, 1]


def test_hit_stops_at_first_missing_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(12))
    compute(bm, a)
    bm.free(a)
    b = make_seq([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])  # block 1 differs; block 2 equal, new parent
    assert bm.allocate_cached_prefix(b) == 4
    assert b.block_table == [0]


def test_hash_collision_is_not_a_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    other = [7, 7, 7, 7]
    bm._hash_to_block[hash_block(None, other)] = 0  # pretend `other` collides with block 0's hash
    b = make_seq(other + [1])
    assert bm.allocate_cached_prefix(b) == 0
    assert b.block_table == [] and b.block_hashes == []
    assert bm.blocks[0].ref_count == 0
    assert list(bm._cached) == [1, 0]


def test_cached_prefix_is_only_for_a_sequence_without_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(8))
    assert bm.allocate(seq, 8)
    with pytest.raises(AssertionError):
        bm.allocate_cached_prefix(seq)


def test_duplicate_block_is_not_published_twice() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(range(5)), make_seq(range(5))
    for seq in (a, b):  # both compute the same prefix before either publishes it
        assert bm.allocate(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.commit(seq)
    assert a.block_hashes == b.block_hashes == hash_blocks(range(4), BS)
    assert bm.blocks[0].hash == a.block_hashes[0]
    assert bm.blocks[2].hash is None  # b's copy stays private
    assert bm.take_events().stored == a.block_hashes
    bm.free(b)
    assert list(bm._free) == [4, 5, 6, 7, 3, 2]
    bm.free(a)
    assert list(bm._cached) == [0]
    assert_all_released(bm)


# ---- LRU eviction ----------------------------------------------------------------------------


def fill_and_free(bm: BlockManager) -> tuple[Sequence, Sequence, Sequence]:
    """a=[0, 1], b=[2, 3, 4], c=[5, 6], all full and computed, freed in the order b, a, c."""
    a, b, c = make_seq(range(0, 8)), make_seq(range(100, 112)), make_seq(range(200, 208))
    for seq in (a, b, c):
        compute(bm, seq)
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3, 4], [5, 6])
    for seq in (b, a, c):
        bm.free(seq)
    return a, b, c


def test_lru_eviction_order_is_exact() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a, b, c = fill_and_free(bm)
    hashes = {seq.request_id: hash_blocks(seq.token_ids, BS) for seq in (a, b, c)}
    bm.take_events()
    assert list(bm._cached) == [4, 3, 2, 1, 0, 6, 5]
    taker = make_seq(range(1000, 1040))
    assert bm.allocate(taker, 40)
    assert taker.block_table == [7, 8, 9, 4, 3, 2, 1, 0, 6, 5]
    ha, hb, hc = hashes[a.request_id], hashes[b.request_id], hashes[c.request_id]
    assert bm.take_events().evicted == hb[::-1] + ha[::-1] + hc[::-1]
    assert bm.cached_hashes() == []


def test_lru_eviction_partial() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a, b, c = fill_and_free(bm)
    taker = make_seq(range(1000, 1020))
    assert bm.allocate(taker, 20)
    assert taker.block_table == [7, 8, 9, 4, 3]
    assert list(bm._cached) == [2, 1, 0, 6, 5]
    again_b = make_seq(b.token_ids)  # b's head survives, but a hit needs an unbroken chain from block 0
    assert bm.allocate_cached_prefix(again_b) == 4
    assert again_b.block_table == [2]


def test_hit_makes_blocks_most_recently_used() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a, _, _ = fill_and_free(bm)
    e = make_seq(a.token_ids + [99])
    compute(bm, e)
    assert e.block_table == [0, 1, 7]
    bm.free(e)
    assert list(bm._cached) == [4, 3, 2, 6, 5, 1, 0]
    assert list(bm._free) == [8, 9, 7]
    taker = make_seq(range(1000, 1040))
    assert bm.allocate(taker, 40)
    assert taker.block_table == [8, 9, 7, 4, 3, 2, 6, 5, 1, 0]


def test_eviction_clears_the_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    taker = make_seq(range(100, 104))
    assert bm.allocate(taker, 4)
    assert taker.block_table == [1]
    assert bm.blocks[1].hash is None and bm.blocks[1].token_ids == ()
    assert bm.cached_hashes() == hash_blocks(range(4), BS)
    assert_consistent(bm)


# ---- KV events and snapshots ------------------------------------------------------------------


def test_events_report_stored_then_drain() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    events = bm.take_events()
    assert events.stored == hash_blocks(range(8), BS)
    assert events.evicted == []
    empty = bm.take_events()
    assert empty.stored == [] and empty.evicted == []


def test_stored_then_evicted_in_one_window_cancels() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    assert bm.allocate(make_seq(range(100, 108)), 8)
    events = bm.take_events()
    assert events.stored == [] and events.evicted == []


def test_evicted_then_restored_in_one_window_cancels() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    bm.take_events()
    squatter = make_seq(range(100, 108))
    assert bm.allocate(squatter, 8)  # evicts a's blocks, publishes nothing
    bm.free(squatter)
    compute(bm, make_seq(range(8)))  # computes and publishes a's hashes again
    events = bm.take_events()
    assert events.stored == [] and events.evicted == []
    assert sorted(bm.cached_hashes()) == sorted(hash_blocks(range(8), BS))


def test_events_are_net_and_disjoint() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a)
    bm.free(a)
    bm.take_events()
    ha = hash_blocks(range(8), BS)
    b = make_seq(range(100, 116))  # takes the 2 free blocks, then evicts a's tail and head
    compute(bm, b)
    hb = hash_blocks(range(100, 116), BS)
    events = bm.take_events()
    assert events.stored == hb
    assert events.evicted == [ha[1], ha[0]]
    assert not set(events.stored) & set(events.evicted)


def test_cached_hashes_is_a_snapshot_of_resident_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = make_seq(range(5)), make_seq(range(100, 104))
    compute(bm, a)
    compute(bm, b)
    snapshot = bm.cached_hashes()
    assert sorted(snapshot) == sorted(hash_blocks(range(4), BS) + hash_blocks(range(100, 104), BS))
    bm.free(a)  # a cached block is still resident
    assert sorted(bm.cached_hashes()) == sorted(snapshot)
    taker = make_seq(range(200, 212))
    assert bm.allocate(taker, 12)  # takes 2 free blocks, evicts a's block 0
    assert bm.cached_hashes() == hash_blocks(range(100, 104), BS)
    assert len(snapshot) == 2  # the earlier snapshot was a copy


def test_events_replayed_on_a_snapshot_track_the_cache() -> None:
    """A consumer that starts from a snapshot and applies every drained window stays exact."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=16, block_size=BS)
    view = set(bm.cached_hashes())
    live: list[Sequence] = []
    for _ in range(300):
        if live and (rng.random() < 0.45 or bm.num_free_blocks < 4):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq = make_seq([rng.randrange(3) for _ in range(rng.randrange(1, 13))])  # few values: many hits
            compute(bm, seq)
            live.append(seq)
        if rng.random() < 0.3:
            events = bm.take_events()
            assert not set(events.stored) & set(events.evicted)
            assert not set(events.stored) & view and set(events.evicted) <= view
            view = (view - set(events.evicted)) | set(events.stored)
            assert view == set(bm.cached_hashes())
        assert_consistent(bm)
    for seq in live:
        bm.free(seq)
    assert_all_released(bm)


# ---- accounting -------------------------------------------------------------------------------


def test_every_block_is_released_after_all_sequences_are_freed() -> None:
    rng = random.Random(1)
    bm = BlockManager(num_blocks=32, block_size=BS)
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(200):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 6):
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        seq = make_seq(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))])
        compute(bm, seq)
        live.append(seq)
        assert bm.num_used_blocks == len({b for s in live for b in s.block_table})
    for seq in live:
        bm.free(seq)
    assert_all_released(bm)
