"""The model's one attention entry point: attend over the paged cache, which already holds the step's
new keys and values (the rotary kernel stores them: `engine/layers/rotary.py`).

The model runner builds one `AttentionMetadata` per step; every layer reads the same one.
The backend behind it never changes the model code: flash-attn on a GPU when it is installed and
the cache's pages suit it, else Triton kernels on a GPU, the torch reference on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.flash_attention import flash_attn_supports, flash_paged_attention
from kernels.paged_attention import paged_attention, paged_attention_ref
from kernels.triton_compat import HAS_TRITON


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens come from and where their K/V go, for a varlen batch of B sequences."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1 = padding)
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: cached + new tokens of each sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    num_splits: int = 1  # KV splits per sequence (flash-decoding) for the GPU kernel


def attention_backend(device: torch.device, block_size: int, batch_invariant: bool = False, fp8: bool = False) -> str:
    """Which implementation runs attention on `device` with `block_size`-token pages:
    "flash-attn", "triton" or "torch-reference". The batch-invariant mode never takes flash-attn, whose
    decode and prefill paths reduce a query's keys in different orders; nor does an FP8 cache, which it cannot
    read."""
    if device.type != "cuda":
        return "torch-reference"
    if flash_attn_supports(block_size) and not batch_invariant and not fp8:
        return "flash-attn"
    return "triton" if HAS_TRITON else "torch-reference"


class Attention(nn.Module):
    """Paged attention for one layer; `k_cache`/`v_cache` are views the model runner binds at start."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D]
        self.v_cache = torch.empty(0)
        self.backend = "torch-reference"
        self.max_seq_len = 0
        self.batch_invariant = False
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # an FP8 cache's (k_scale, v_scale) [Hkv]

    def bind_kv_cache(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seq_len: int, batch_invariant: bool,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Attach this layer's slice of the KV cache (called once by the model runner); no sequence is
        ever longer than `max_seq_len` tokens. `batch_invariant`: see engine/batch_invariance.py. `kv_scales`:
        an FP8 cache stores key / k_scale and value / v_scale per KV head (engine/kv_scales.py)."""
        self.k_cache, self.v_cache, self.max_seq_len = k_cache, v_cache, max_seq_len
        self.kv_scales = kv_scales
        self.backend = attention_backend(k_cache.device, k_cache.shape[1], batch_invariant, kv_scales is not None)
        self.batch_invariant = batch_invariant

    def forward(self, q: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D] -> [T, Hq, D]."""
        m = metadata
        if self.backend == "flash-attn":
            return flash_paged_attention(
                q, self.k_cache, self.v_cache, m.query_start_loc, m.seq_lens, m.block_tables, self.scale,
                m.max_query_len, self.max_seq_len,
            )
        if self.backend == "triton":
            return paged_attention(
                q, self.k_cache, self.v_cache, m.query_start_loc, m.seq_lens, m.block_tables, self.scale,
                m.max_query_len, m.num_splits, batch_invariant=self.batch_invariant, kv_scales=self.kv_scales,
            )
        return paged_attention_ref(
            q, self.k_cache, self.v_cache, m.query_start_loc, m.seq_lens, m.block_tables, self.scale, self.kv_scales
        )
