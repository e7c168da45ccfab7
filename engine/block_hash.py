"""The one definition of a KV block's identity, shared by the engine's prefix cache and the router.

A full block's hash chains the previous block's hash with the block's token ids, so equal
hashes mean equal whole prefixes. xxh3-64 over little-endian bytes with a fixed seed: the
value is stable across processes, machines and Python versions (no PYTHONHASHSEED).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence

import xxhash

_SEED = 0x6E616E6F  # "nano"
_ROOT = 0  # parent hash of the first block


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash (None for the first block)."""
    tokens = array.array("I", token_ids)
    if sys.byteorder != "little":
        tokens.byteswap()
    h = xxhash.xxh3_64(seed=_SEED)
    h.update((_ROOT if parent_hash is None else parent_hash).to_bytes(8, "little"))
    h.update(tokens.tobytes())
    return h.intdigest()


def hash_blocks(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hash chain of every full block of `token_ids` (a trailing partial block has no hash)."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
