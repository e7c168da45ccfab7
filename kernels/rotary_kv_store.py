"""Straight out of the fused QKV projection: Qwen3's per-head RMSNorm of q and k when norm weights are
given (Qwen2 has none), rotary embedding of q and k, and the new keys and values written into the paged
KV cache by slot. Each head is read once and its rotated result written once: query heads to the returned
q, KV heads (with their values) to the cache, so attention finds every token of the step there.

Roundings follow the unfused torch code: the normalised head is rounded to the input dtype and
scaled by the weight, then q*cos and rotate_half(q)*sin are each rounded before their sum.
"""

from __future__ import annotations

from typing import cast

import torch

from kernels.fp8_kv import E4M3_MAX, quantize_ref
from kernels.rms_norm import rms_norm_ref
from kernels.triton_compat import tl, triton


def rotary_kv_store(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]
    positions: torch.Tensor,  # [T]
    q_weight: torch.Tensor | None,  # [D]; None (with k_weight None): rotary only, no norm
    k_weight: torch.Tensor | None,  # [D]
    cos: torch.Tensor,  # [max_position, D] float32
    sin: torch.Tensor,  # [max_position, D] float32
    eps: float,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64: block_id * block_size + offset; -1 = padding, not stored
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # an FP8 cache's (k_scale, v_scale) [Hkv] float32
) -> torch.Tensor:  # q [T, Hq, D]
    """Triton version of `rotary_kv_store_ref`, no host synchronisation."""
    num_tokens = qkv.shape[0]
    head_dim = cos.shape[1]
    has_norm = q_weight is not None
    assert (k_weight is not None) == has_norm, "q and k norm weights come together"
    assert qkv.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    heads_per_program = _heads_per_program(num_heads, num_kv_heads)
    grid = (num_tokens, (num_heads + num_kv_heads) // heads_per_program)
    k_scale, v_scale = kv_scales if kv_scales is not None else (cos, cos)  # unused without FP8
    _rotary_kv_store_kernel[grid](
        qkv, positions, q_weight, k_weight, cos, sin, q, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        qkv.stride(0), eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, HAS_NORM=has_norm,
        HEADS=heads_per_program, FP8=kv_scales is not None, E4M3_MAX=E4M3_MAX,
    )
    return q


def _heads_per_program(num_heads: int, num_kv_heads: int) -> int:
    """Up to 8 heads per program (a power of two dividing both head counts): a program per head was ~5x slower
    on 16k tokens (too little work per program). The same for every step, whatever its token count: Triton sums
    a head's squares in an order that follows the tile's shape, so a count chosen by step size (once: 1 head
    below 1,024 tokens) moved a token's keys by a bf16 ulp between steps (bench/RESULTS.md)."""
    heads = 8
    while num_heads % heads or num_kv_heads % heads:
        heads //= 2
    return heads


@triton.jit
def _rotary_kv_store_kernel(
    QKV, positions, Wq, Wk, Cos, Sin, Q, K_cache, V_cache, slot_mapping, K_scale, V_scale, stride_t, eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
    HEADS: tl.constexpr, FP8: tl.constexpr, E4M3_MAX: tl.constexpr,
):
    """Program (t, g) takes HEADS heads of token t: query heads, or (for g past them) key heads with their values."""
    t = tl.program_id(0)
    first = tl.program_id(1) * HEADS  # in [query heads | key heads]
    is_q = first < NUM_HEADS
    offs = tl.arange(0, HALF)[None, :]
    heads = first + tl.arange(0, HEADS)[:, None]
    src = QKV + t * stride_t + heads * 2 * HALF + offs
    x1 = tl.load(src)
    x2 = tl.load(src + HALF)
    dtype = x1.dtype
    n1, n2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:  # the weights are None otherwise: this branch is compiled out
        if is_q:
            w1 = tl.load(Wq + offs).to(tl.float32)
            w2 = tl.load(Wq + HALF + offs).to(tl.float32)
        else:
            w1 = tl.load(Wk + offs).to(tl.float32)
            w2 = tl.load(Wk + HALF + offs).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(n1 * n1, 1) + tl.sum(n2 * n2, 1)) / (2 * HALF) + eps)[:, None]
        n1 = ((n1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        n2 = ((n2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(positions + t)
    cos = tl.load(Cos + pos * 2 * HALF + offs).to(dtype).to(tl.float32)  # both halves of the row are equal
    sin = tl.load(Sin + pos * 2 * HALF + offs).to(dtype).to(tl.float32)
    o1 = ((n1 * cos).to(dtype).to(tl.float32) + (-n2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((n2 * cos).to(dtype).to(tl.float32) + (n1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if is_q:
        dst = Q + (t * NUM_HEADS + heads) * 2 * HALF + offs
        tl.store(dst, o1)
        tl.store(dst + HALF, o2)
    else:
        slot = tl.load(slot_mapping + t)
        stored = offs < tl.where(slot >= 0, HALF, 0)  # a padding token's key and value are not stored
        kv_offset = (slot * NUM_KV_HEADS + heads - NUM_HEADS) * 2 * HALF + offs
        value = src + NUM_KV_HEADS * 2 * HALF  # the value head sits Hkv heads after its key head
        k1, k2, v1, v2 = o1, o2, tl.load(value), tl.load(value + HALF)
        if FP8:  # stored / the head's scale, as kernels/fp8_kv.py rounds it
            k_scale = tl.load(K_scale + heads - NUM_HEADS)
            v_scale = tl.load(V_scale + heads - NUM_HEADS)
            k1, k2 = _quantize(k1, k_scale, E4M3_MAX), _quantize(k2, k_scale, E4M3_MAX)
            v1, v2 = _quantize(v1, v_scale, E4M3_MAX), _quantize(v2, v_scale, E4M3_MAX)
        tl.store(K_cache + kv_offset, k1, mask=stored)
        tl.store(K_cache + kv_offset + HALF, k2, mask=stored)
        tl.store(V_cache + kv_offset, v1, mask=stored)
        tl.store(V_cache + kv_offset + HALF, v2, mask=stored)


@triton.jit
def _quantize(x, scale, E4M3_MAX: tl.constexpr):
    """x / scale in e4m3, clamped into its range (e4m3fn has no infinity)."""
    return tl.clamp(x.to(tl.float32) / scale, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)


def rotary_kv_store_ref(
    qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, eps: float, num_heads: int, num_kv_heads: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Token t's rotated key and its value go to slot `slot_mapping[t]` (a flat index over blocks x
    block_size) of the caches, divided by `kv_scales` (per KV head) into an FP8 cache; returns the rotated
    queries."""
    head_dim = cos.shape[1]
    assert (q_weight is None) == (k_weight is None), "q and k norm weights come together"
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.reshape(-1, num_heads, head_dim), k.reshape(-1, num_kv_heads, head_dim)
    if q_weight is not None and k_weight is not None:
        q = cast(torch.Tensor, rms_norm_ref(q, q_weight, eps))
        k = cast(torch.Tensor, rms_norm_ref(k, k_weight, eps))
    c = cos[positions].unsqueeze(1).to(qkv.dtype)  # [T, 1, D]
    s = sin[positions].unsqueeze(1).to(qkv.dtype)
    stored = slot_mapping >= 0
    slots = slot_mapping[stored]
    keys, values = (k * c + _rotate_half(k) * s)[stored], v.reshape(-1, num_kv_heads, head_dim)[stored]
    if kv_scales is not None:
        keys, values = (quantize_ref(x, scale[:, None]) for x, scale in zip((keys, values), kv_scales))
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = keys
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = values
    return q * c + _rotate_half(q) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
