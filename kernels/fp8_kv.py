"""An FP8 KV cache's values: e4m3 numbers holding value / scale, one scale per KV head (engine/kv_scales.py picks
scales no value can exceed); attention reads stored * scale. The torch reference of the store's rounding."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float8_e4m3fn (rounded to nearest); `scale` broadcasts against x (a KV head's, per head).
    Clamped first: e4m3fn has no infinity, and a value past its range would become NaN."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
