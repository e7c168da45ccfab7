"""Write new keys and values into the paged KV cache by slot."""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64: block_id * block_size + offset; -1 = padding, not stored
) -> None:
    """Token t's K/V go to slot `slot_mapping[t]` (a flat index over blocks x block_size)."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid]
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid]
