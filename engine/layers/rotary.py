"""Rotary position embedding (RoPE), applied together with Qwen3's per-head q/k RMSNorm where the model has it,
and the store of the step's keys and values into the paged KV cache."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import YarnScaling
from engine.layers.layernorm import RMSNorm
from kernels.rotary_kv_store import rotary_kv_store, rotary_kv_store_ref
from kernels.triton_compat import use_triton


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables; `forward` rotates q and k straight from the QKV output, normalised first
    when the model has q/k norms."""

    def __init__(self, head_dim: int, max_position: int, base: float, yarn: YarnScaling | None = None) -> None:
        super().__init__()
        # Same arithmetic as Hugging Face's RoPE, so fp32 results match bit for bit.
        pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        inv_freq, scale = (1.0 / pos_freqs, 1.0) if yarn is None else yarn_inv_freq(pos_freqs, head_dim, base, yarn)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
        num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """positions: [T], qkv: [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], rotated (and first normalised, given the
        norms: both or neither). The keys, rotated (and normalised) the same way, and the values go straight
        into the paged KV cache at `slot_mapping` (one kernel on a GPU), divided by `kv_scales` into an FP8 cache."""
        fn = rotary_kv_store if use_triton(qkv) else rotary_kv_store_ref
        cache = (k_cache, v_cache, slot_mapping, kv_scales)
        if q_norm is None or k_norm is None:
            assert q_norm is k_norm, "q and k norms come together"
            return fn(qkv, positions, None, None, self.cos, self.sin, 0.0, num_heads, num_kv_heads, *cache)
        return fn(qkv, positions, q_norm.weight, k_norm.weight, self.cos, self.sin, q_norm.eps, num_heads,
                  num_kv_heads, *cache)


def yarn_inv_freq(pos_freqs: torch.Tensor, head_dim: int, base: float, yarn: YarnScaling) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): the rotary frequencies, and the scale of cos and sin, as Hugging Face computes them.

    Dimensions that turn many times within the original context keep their frequency (extrapolation); those that
    turn less than once are divided by the factor (interpolation); a linear ramp blends the dimensions between,
    which the beta_fast and beta_slow rotation counts bound. cos and sin grow by 0.1 ln(factor) + 1 (the
    attention factor), sharpening attention over the longer context.
    """

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times in the original context
        turns = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(base))

    low, high = dimension(yarn.beta_fast), dimension(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # 1: keep the frequency, 0: divide it by the factor
    inv_freq = 1.0 / (yarn.factor * pos_freqs) * (1 - extrapolated) + 1.0 / pos_freqs * extrapolated

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = yarn.attention_factor
    if attention_factor is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim)
        else:
            attention_factor = mscale(yarn.factor)
    return inv_freq, float(attention_factor)
