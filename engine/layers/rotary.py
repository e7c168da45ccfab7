"""Rotary position embedding (RoPE), applied together with Qwen3's per-head q/k RMSNorm where the model has it,
and the store of the step's keys and values into the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.layernorm import RMSNorm
from kernels.rotary_kv_store import rotary_kv_store, rotary_kv_store_ref
from kernels.triton_compat import use_triton


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables; `forward` rotates q and k straight from the QKV output, normalised first
    when the model has q/k norms."""

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        # Same arithmetic as Hugging Face's default RoPE, so fp32 results match bit for bit.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
        num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """positions: [T], qkv: [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], rotated (and first normalised, given the
        norms: both or neither). The keys, rotated (and normalised) the same way, and the values go straight
        into the paged KV cache at `slot_mapping` (one kernel on a GPU)."""
        fn = rotary_kv_store if use_triton(qkv) else rotary_kv_store_ref
        cache = (k_cache, v_cache, slot_mapping)
        if q_norm is None or k_norm is None:
            assert q_norm is k_norm, "q and k norms come together"
            return fn(qkv, positions, None, None, self.cos, self.sin, 0.0, num_heads, num_kv_heads, *cache)
        return fn(qkv, positions, q_norm.weight, k_norm.weight, self.cos, self.sin, q_norm.eps, num_heads,
                  num_kv_heads, *cache)
