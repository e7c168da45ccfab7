"""The model's one attention entry point: store new K/V into the paged cache, then attend.

The model runner builds one `AttentionMetadata` per step; every layer reads the same one.
The backend behind it (torch reference on CPU; GPU kernels later) never changes the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.kv_store import store_kv_ref
from kernels.paged_attention import paged_attention_ref


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens come from and where their K/V go, for a varlen batch of B sequences."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1 = padding)
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: cached + new tokens of each sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int


class Attention(nn.Module):
    """Paged attention for one layer; `k_cache`/`v_cache` are views the model runner binds at start."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D], bound by the model runner
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        store_kv_ref(k, v, self.k_cache, self.v_cache, metadata.slot_mapping)
        return paged_attention_ref(
            q, self.k_cache, self.v_cache, metadata.query_start_loc, metadata.seq_lens,
            metadata.block_tables, self.scale,
        )
