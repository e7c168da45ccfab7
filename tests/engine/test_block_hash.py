"""The block-hash chain: stable across processes, full blocks only, equal hashes mean equal prefixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_hash import hash_block, hash_blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENS = list(range(10))  # two full blocks of 4 and a partial one of 2
BLOCK_SIZE = 4

# Pinned once: any change here changes every router's view of every replica's cache.
GOLDEN_FIRST_BLOCK = 7298480917307073105  # hash_block(None, [1, 2, 3, 4])
GOLDEN_CHAIN = [9467251487050355554, 14551064939243825223]  # hash_blocks(TOKENS, 4)
GOLDEN_EXTREME_IDS = [12799319367824350480, 4573263402784084238]  # hash_blocks([151643, 0, 2**32 - 1, 7], 2)


def test_golden_values() -> None:
    assert hash_block(None, [1, 2, 3, 4]) == GOLDEN_FIRST_BLOCK
    assert hash_blocks(TOKENS, BLOCK_SIZE) == GOLDEN_CHAIN
    assert hash_blocks([151643, 0, 2**32 - 1, 7], 2) == GOLDEN_EXTREME_IDS


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_same_values_in_another_process(hash_seed: str) -> None:
    code = (
        "import json; from engine.block_hash import hash_block, hash_blocks; "
        "print(json.dumps([hash_block(None, [1, 2, 3, 4]), hash_blocks(list(range(10)), 4)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [GOLDEN_FIRST_BLOCK, GOLDEN_CHAIN]


def test_partial_trailing_block_has_no_hash() -> None:
    assert hash_blocks([], BLOCK_SIZE) == []
    assert hash_blocks([1, 2, 3], BLOCK_SIZE) == []
    assert len(hash_blocks(list(range(8)), BLOCK_SIZE)) == 2
    assert hash_blocks(list(range(11)), BLOCK_SIZE) == hash_blocks(list(range(8)), BLOCK_SIZE)


def test_chain_matches_hash_block() -> None:
    first = hash_block(None, TOKENS[0:4])
    assert hash_blocks(TOKENS, BLOCK_SIZE) == [first, hash_block(first, TOKENS[4:8])]


def test_list_and_tuple_hash_alike() -> None:
    assert hash_block(None, tuple(TOKENS[:4])) == hash_block(None, TOKENS[:4])


@pytest.mark.parametrize("changed_block", [0, 1, 2, 3])
def test_changing_one_block_changes_it_and_all_later_ones(changed_block: int) -> None:
    tokens = list(range(100, 116))
    changed = list(tokens)
    changed[changed_block * BLOCK_SIZE + 1] += 1
    before, after = hash_blocks(tokens, BLOCK_SIZE), hash_blocks(changed, BLOCK_SIZE)
    assert after[:changed_block] == before[:changed_block]
    assert all(a != b for a, b in zip(after[changed_block:], before[changed_block:]))


def test_same_block_under_different_parents_differs() -> None:
    block = [5, 6, 7, 8]
    under_a = hash_blocks([1, 2, 3, 4] + block, BLOCK_SIZE)
    under_b = hash_blocks([9, 9, 9, 9] + block, BLOCK_SIZE)
    assert under_a[1] != under_b[1]
    assert hash_block(None, block) != hash_block(hash_block(None, block), block)


def test_prefix_property() -> None:
    tokens = list(range(1000, 1037))
    full = hash_blocks(tokens, BLOCK_SIZE)
    for n in range(len(tokens) + 1):
        assert hash_blocks(tokens[:n], BLOCK_SIZE) == full[: n // BLOCK_SIZE]
