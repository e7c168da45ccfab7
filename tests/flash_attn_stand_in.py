"""A stand-in for the `flash_attn` package (not installable on the CPU machines): its
`flash_attn_varlen_func` with flash-attn 2's documented contract for a paged cache, checked on every
call, computed in plain torch. Tests install it in sys.modules to drive the flash-attn code path."""

from __future__ import annotations

import importlib.machinery
import types

import torch


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None = None, causal: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    assert block_table is not None and causal, "the engine attends causally over a paged cache"
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("block_table", block_table)):
        assert t.dtype == torch.int32 and t.stride(-1) == 1, f"{name} must be contiguous int32"
    page = k.shape[1]
    assert page % 256 == 0, "Paged KV cache block size must be divisible by 256"
    q_lens, k_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    assert len(q_lens) == len(k_lens) == block_table.shape[0]
    assert max_seqlen_q >= max(q_lens) and max_seqlen_k >= max(k_lens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    start = 0
    for q_len, k_len, pages in zip(q_lens, k_lens, block_table.long()):
        keys = k[pages].flatten(0, 1)[:k_len].float()  # [S, Hkv, D]
        values = v[pages].flatten(0, 1)[:k_len].float()
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len].float(), keys) * scale
        # Causal, aligned to the end: query j sees keys 0 .. k_len - q_len + j.
        visible = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        start += q_len
    return out


module = types.ModuleType("flash_attn")
module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # find_spec() callers expect one
module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
