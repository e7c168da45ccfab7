"""Scales for an FP8 KV cache: for each layer and KV head, a bound on |key| and |value| that no input can exceed,
from the weights alone.

e4m3 keeps 3 mantissa bits at every exponent from 2^-6 to 448 (and subnormals below), so a stored value's
relative error is the same whether it is near the scale's top or 100x below it: a loose bound costs little
precision, while a bound that a large activation exceeds would saturate it. So the bounds are proofs, not
statistics:

- The projections' input is RMS-normalised, h = x_hat * w_norm with |x_hat| (L2) <= sqrt(hidden), so by
  Cauchy-Schwarz each output j of the k and v projections obeys |out_j| <= sqrt(hidden) * |W_j * w_norm| + |b_j|.
- Qwen3 normalises each key head too: |k| (L2) <= sqrt(head_dim) * max |w_k_norm| for every key, whatever h is.
- Rotary turns pairs (i, i + head_dim / 2) and keeps each pair's length, times cos/sin's scale (YaRN's attention
  factor): |k'_i| <= scale * sqrt(k_i^2 + k_(i + head_dim/2)^2).

The computation rounds to bf16 a few times between, each rounding moving a value by at most 2^-8 of itself:
ROUNDING_MARGIN covers them. Values are stored as value / scale with scale = bound * margin / 448.
"""

from __future__ import annotations

import torch

from engine.models.qwen import QwenDecoderLayer
from kernels.fp8_kv import E4M3_MAX

ROUNDING_MARGIN = 1.05


def fp8_kv_scales(layer: QwenDecoderLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale): float32 [this rank's KV heads] for `layer`'s cache."""
    attn = layer.self_attn
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    weight = attn.qkv_proj.weight.float() * layer.input_layernorm.weight.float()  # the norm's weight folded in
    hidden = weight.shape[1]
    bounds = hidden**0.5 * weight.norm(dim=1)
    if attn.qkv_proj.bias is not None:
        bounds = bounds + attn.qkv_proj.bias.float().abs()
    k_rows, v_rows = bounds[heads * head_dim :].view(2, kv_heads, head_dim)
    if attn.k_norm is not None:
        k_pairs = head_dim**0.5 * attn.k_norm.weight.float().abs().max().expand(kv_heads)
    else:
        half = head_dim // 2
        k_pairs = (k_rows[:, :half] ** 2 + k_rows[:, half:] ** 2).sqrt().max(dim=1).values
    rotary_scale = torch.maximum(attn.rotary.cos.abs().max(), attn.rotary.sin.abs().max()).float()
    k_bound, v_bound = rotary_scale * k_pairs, v_rows.max(dim=1).values
    tiny = torch.finfo(torch.float32).tiny  # a head of zero weights stores zeros
    return ((k_bound * ROUNDING_MARGIN / E4M3_MAX).clamp_min(tiny).contiguous(),
            (v_bound * ROUNDING_MARGIN / E4M3_MAX).clamp_min(tiny).contiguous())
