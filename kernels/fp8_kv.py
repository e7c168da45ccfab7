"""An FP8 KV cache's values: e4m3 numbers holding value / scale, one scale per KV head (engine/kv_scales.py picks
scales no value can exceed); attention reads stored * scale. The torch reference of the store's rounding.

An FP8 cache keeps its values transposed within each block, [num_blocks, Hkv, head_dim, block_size] (keys keep
[num_blocks, block_size, Hkv, head_dim]). Attention's P @ V takes V as a matrix operand along the keys; Hopper's
matrix loads transpose only 16-bit elements, so from the usual layout Triton's sm_90 build reads e4m3 values from
shared memory one byte per load. Along the keys it reads them in 16-byte vectors.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float8_e4m3fn (rounded to nearest); `scale` broadcasts against x (a KV head's, per head).
    Clamped first: e4m3fn has no infinity, and a value past its range would become NaN."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_v_layout(v_cache: torch.Tensor) -> torch.Tensor:
    """A [num_blocks, block_size, Hkv, head_dim] value cache's memory as an FP8 cache's values, [num_blocks, Hkv,
    head_dim, block_size]: a view of the same bytes (the engine allocates both layouts alike)."""
    num_blocks, block_size, num_kv_heads, head_dim = v_cache.shape
    return v_cache.view(num_blocks, num_kv_heads, head_dim, block_size)
