"""flash-attn's varlen attention over the paged KV cache, used when the package is installed
(`pip install nanoserve[flash]`) and the cache's pages suit it; same contract as `paged_attention`.

flash-attn 2 reads a paged cache only in pages of a multiple of 256 tokens (`--block-size 256`); with
smaller pages the engine keeps its Triton kernel. The import is deferred to the first call, so this
module costs nothing where flash-attn is absent.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
FLASH_ATTN_PAGE_MULTIPLE = 256


def flash_attn_supports(block_size: int) -> bool:
    """Whether flash-attn is installed and can read a cache of `block_size`-token pages."""
    return HAS_FLASH_ATTN and block_size % FLASH_ATTN_PAGE_MULTIPLE == 0


def flash_paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], this step's K already stored
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor,  # [B] int32, context + new tokens per sequence
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,  # an upper bound: a CUDA graph replays with the value it was captured with
) -> torch.Tensor:  # [T, Hq, D]
    """Each sequence's new tokens attend causally to its whole cached context (the causal mask is
    aligned to the end of the sequence, as flash-attn 2 does when query and key lengths differ)."""
    from flash_attn import flash_attn_varlen_func

    # flash-attn takes the lengths cumulated; derived here (two tiny kernels, captured with the graph) so the
    # step's metadata stays the one both backends read.
    cu_seq_lens = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]

    return flash_attn_varlen_func(
        query, k_cache, v_cache, cu_seqlens_q=query_start_loc, cu_seqlens_k=cu_seq_lens,
        max_seqlen_q=max_query_len, max_seqlen_k=max_seq_len, softmax_scale=scale, causal=True,
        block_table=block_tables,
    )
