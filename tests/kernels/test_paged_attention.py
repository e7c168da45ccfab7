"""Triton paged attention and KV store against their torch references.

On CPU these run in Triton's interpreter (small shapes, float32); on a GPU the same tests run
compiled, with more shapes and half precisions.
"""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import decode_kv_splits, paged_attention, paged_attention_ref
from kernels.triton_compat import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_batch(
    q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    page: int, dtype: torch.dtype, seed: int,
) -> dict:
    """A varlen batch over a randomly permuted paged cache holding every token's K/V."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, context_lens)]
    blocks_per_seq = [-(-n // page) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(perm[used : used + n] + [0] * (max(blocks_per_seq) - n))
        used += n
    cache_shape = (num_blocks, page, num_kv_heads, head_dim)
    return dict(
        query=torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(DEVICE, dtype),
        k_cache=torch.randn(cache_shape, generator=g).to(DEVICE, dtype),
        v_cache=torch.randn(cache_shape, generator=g).to(DEVICE, dtype),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5,
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [
    # (q_lens, context_lens): decode only, prefill only, mixed with cached prefixes, block boundaries.
    ([1, 1, 1], [15, 16, 17]),
    ([37, 16, 1], [0, 0, 0]),
    ([1, 20, 3, 1], [63, 33, 0, 1]),
    ([64, 1], [64, 200]),
]


def attention_combos() -> list[tuple]:
    """Every case with every dtype; heads, head dims, page sizes and split counts cycle through them,
    so each value is covered without compiling the whole product (slow on a GPU, slower interpreted)."""
    heads = [(4, 4), (4, 2), (8, 2)]
    head_dims = [64, 128] if ON_GPU else [64]
    pages = [16, 32] if ON_GPU else [16]
    combos = []
    for i, (q_lens, context_lens) in enumerate(CASES):
        for j, dtype in enumerate(DTYPES):
            for num_splits in (1, 4):
                n = i * len(DTYPES) + j + num_splits
                combos.append((q_lens, context_lens, *heads[n % 3], head_dims[n % len(head_dims)],
                               pages[(n // 2) % len(pages)], num_splits, dtype))
    return combos


@pytest.mark.parametrize(
    "q_lens,context_lens,num_heads,num_kv_heads,head_dim,page,num_splits,dtype", attention_combos()
)
def test_paged_attention_matches_reference(
    q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    page: int, num_splits: int, dtype: torch.dtype,
) -> None:
    batch = make_batch(q_lens, context_lens, num_heads, num_kv_heads, head_dim, page, dtype, seed=len(q_lens))
    ref = paged_attention_ref(**batch)
    out = torch.full_like(batch["query"], float("nan"))  # poisoned: every element must be written
    paged_attention(**batch, max_query_len=max(q_lens), num_splits=num_splits, out=out)
    assert not out.isnan().any()
    assert relative_error(out, ref) < TOLERANCE[dtype]


def test_decode_kv_splits_fill_the_gpu_with_at_most_sixteen() -> None:
    # One program per (sequence, KV head); split until there are two programs per SM, capped at 16 splits.
    assert [decode_kv_splits(b, 8, 132) for b in (1, 2, 4, 8, 16, 17, 32, 33, 256)] == [16, 16, 16, 8, 4, 2, 2, 1, 1]
