"""Triton paged attention and KV store against their torch references.

On CPU these run in Triton's interpreter (small shapes, float32); on a GPU the same tests run
compiled, with more shapes and half precisions.
"""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_kv import quantize_ref
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
    # One program per (sequence, KV head); split until there is one program per SM, capped at 16 splits.
    assert [decode_kv_splits(b, 8, 132) for b in (1, 2, 4, 8, 9, 16, 17, 32, 256)] == [16, 16, 8, 4, 2, 2, 1, 1, 1]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (8, 2)])
def test_batch_invariant_mode_matches_the_reference(num_heads: int, num_kv_heads: int) -> None:
    for q_lens, context_lens in CASES:
        batch = make_batch(q_lens, context_lens, num_heads, num_kv_heads, 64, 16, DTYPES[-1], seed=7)
        out = paged_attention(**batch, max_query_len=max(q_lens), batch_invariant=True)
        assert relative_error(out, paged_attention_ref(**batch)) < TOLERANCE[DTYPES[-1]]


@pytest.mark.skipif(not ON_GPU, reason="bitwise equality is a property of the compiled kernel (needs a GPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batch_invariant_mode_reduces_a_query_alike_on_every_path(dtype: torch.dtype) -> None:
    """A sequence's last token, computed as a decode, in a decode batch, and as the end of prefill chunks of
    several sizes: bitwise the same output in the mode (the same case without it differs: a negative control)."""
    context, num_heads, num_kv_heads, head_dim = 1000, 16, 8, 128
    batch = make_batch([context], [0], num_heads, num_kv_heads, head_dim, 16, dtype, seed=11)
    query, last = batch["query"], batch["query"][-1:]

    def last_token(q: torch.Tensor, q_lens: list[int], invariant: bool, num_splits: int = 1) -> torch.Tensor:
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        seq_lens = torch.tensor([context] * len(q_lens), dtype=torch.int32, device=DEVICE)
        tables = batch["block_tables"].expand(len(q_lens), -1).contiguous()
        out = paged_attention(q, batch["k_cache"], batch["v_cache"], starts, seq_lens, tables, batch["scale"],
                              max(q_lens), num_splits, batch_invariant=invariant)
        return out[q_lens[0] - 1]

    for invariant in (True, False):
        decode = last_token(last, [1], invariant)
        paths = {f"prefill chunk of {n}": last_token(query[-n:], [n], invariant) for n in (2, 64, 512, context)}
        paths["decode beside 63 others"] = last_token(torch.cat([last, query[:63]]), [1] * 64, invariant)
        if not invariant:
            paths["decode in 4 KV splits"] = last_token(last, [1], invariant, num_splits=4)
        differ = [name for name, out in paths.items() if not torch.equal(out, decode)]
        assert (differ == []) == invariant, (invariant, differ)


@pytest.mark.parametrize("num_splits,batch_invariant", [(1, False), (4, False), (1, True)])
def test_an_fp8_cache_is_read_as_stored_times_its_scales(num_splits: int, batch_invariant: bool) -> None:
    """An e4m3 cache (kernels/fp8_kv.py), a scale per KV head: the kernel widens each tile and applies the scales
    as the reference does, on decode, prefill and mixed batches; and it stays close to attention over the
    unquantised cache (one e4m3 rounding of each key and value). Decode runs over several of its 128-key tiles too."""
    for i, (q_lens, context_lens) in enumerate([*CASES, ([1, 1, 1], [300, 129, 40])]):
        batch = make_batch(q_lens, context_lens, 8, 2, 64, 16, DTYPES[-1], seed=20 + i)
        scales = (torch.tensor([0.015, 0.03], device=DEVICE), torch.tensor([0.02, 0.012], device=DEVICE))  # no clamp
        fp8 = {**batch, "k_cache": quantize_ref(batch["k_cache"], scales[0][:, None]),
               "v_cache": quantize_ref(batch["v_cache"], scales[1][:, None])}
        ref = paged_attention_ref(**fp8, kv_scales=scales)
        out = paged_attention(**fp8, max_query_len=max(q_lens), num_splits=num_splits, batch_invariant=batch_invariant,
                              kv_scales=scales)
        assert relative_error(out, ref) < TOLERANCE[DTYPES[-1]]
        assert relative_error(out, paged_attention_ref(**batch)) < 0.1
