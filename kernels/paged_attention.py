"""Causal attention of a varlen batch over a paged KV cache.

One interface for decode, prefill, chunked prefill and prefix-cache hits: sequence i brings
q_len_i = query_start_loc[i+1] - query_start_loc[i] new tokens, which are the last q_len_i of
its seq_lens[i] tokens; all of them (cached context and new tokens) are already in the cache.
New token j attends causally to every token at or before its own position.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor,  # [B] int32, context + new tokens per sequence
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Reference implementation: gathers each sequence's K/V and attends in float32."""
    out = torch.empty_like(query)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[i] : starts[i + 1]].float()  # [q_len, Hq, D]
        q_len = q.shape[0]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
