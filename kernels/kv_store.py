"""Write new keys and values into the paged KV cache by slot."""

from __future__ import annotations

import torch

from kernels.triton_compat import tl, triton


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64: block_id * block_size + offset; -1 = padding, not stored
) -> None:
    """Triton version of `store_kv_ref`: one program per token, no host synchronisation."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.stride(1) == head_dim and value.stride(1) == head_dim, "heads of a token must be contiguous"
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        ROW=num_kv_heads * head_dim, BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
    )


@triton.jit
def _store_kv_kernel(K, V, K_cache, V_cache, slot_mapping, stride_k, stride_v, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(K_cache + slot * ROW + offs, tl.load(K + t * stride_k + offs, mask=mask), mask=mask)
        tl.store(V_cache + slot * ROW + offs, tl.load(V + t * stride_v + offs, mask=mask), mask=mask)


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Token t's K/V go to slot `slot_mapping[t]` (a flat index over blocks x block_size)."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid]
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid]
