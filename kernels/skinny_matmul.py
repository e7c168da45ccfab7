"""y = x @ w.T for a few rows of x (decode at small batches): a matmul that is one pass over the weight.

With M <= 16 rows a linear layer reads its whole weight to do almost no arithmetic, so its time is the weight's
bytes over the memory bandwidth, if enough of the GPU reads at once. cuBLAS's kernels for these shapes take 2-12x
that on an H200 (bench/skinny_matmul.py). Each program takes BLOCK_N output columns and one of SPLIT_K equal
slices of K; with SPLIT_K > 1 the programs of a column block leave fp32 partial sums, and the last of them to
finish (an atomic counter per column block) adds them in split order and writes the output, so the result does
not depend on which program finished first. A row's sums never see the other rows: its output is the same bits
whatever M is.

`gated`: the weight is a merged [gate | up] projection and the output silu(gate) * up (a SwiGLU MLP's first half);
each program takes the same columns of both halves, and the product is the kernel's epilogue, with the roundings of
kernels/silu_and_mul.py, so the result has the bits of that kernel applied to the plain matmul's output.
"""

from __future__ import annotations

import torch

from kernels.silu_and_mul import silu_and_mul_tile
from kernels.triton_compat import tl, triton
from kernels.workspace import workspace

MAX_ROWS = 16  # the tile's rows (tl.dot's smallest M); more rows go to cuBLAS


def skinny_config(n: int, k: int, split: bool = True) -> tuple[int, int, int]:
    """(block_n, block_k, split_k) for an [n, k] weight: about 100+ programs, each streaming whole K tiles.

    Measured on an H200 over Qwen3-0.6B's projections (bench/skinny_matmul.py): wide weights (qkv, gate_up) do
    best unsplit in 128-wide K tiles; narrow ones (o_proj, down: 32 column blocks) split K four ways. Without
    `split` (the batch-invariant mode: one sum per row, in K order, as cuBLAS without split-K does it), narrow
    weights take narrower column blocks instead.
    """
    block_n = 64 if n >= 6144 else 32
    blocks = triton.cdiv(n, block_n)
    split_k, block_k = 1, min(128, max(16, triton.next_power_of_2(k)))
    if not split:
        return (16 if blocks < 64 else block_n), block_k, 1
    while blocks < 64 and blocks * split_k < 128 and k % (2 * split_k * 256) == 0:
        split_k, block_k = 2 * split_k, 256
    return block_n, block_k, split_k


def skinny_matmul(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    config: tuple[int, int, int] | None = None,  # (block_n, block_k, split_k); default skinny_config(N, K)
    num_warps: int = 4,
    num_stages: int = 3,
    gated: bool = False,
) -> torch.Tensor:  # [M, N], or [M, N / 2] when gated
    """Triton version of `x @ weight.T` for at most MAX_ROWS rows (with `gated`: of silu_and_mul(x @ weight.T)).
    A gated matmul takes `config` for its whole weight; a program then covers block_n weight rows, half of each."""
    num_rows, k = x.shape
    n = weight.shape[0]
    assert num_rows <= MAX_ROWS and weight.shape[1] == k and x.stride(-1) == 1 and weight.is_contiguous()
    block_n, block_k, split_k = config or skinny_config(n, k)
    assert split_k == 1 or k % (split_k * block_k) == 0, "each split a whole number of K tiles"
    if gated:
        n, block_n = n // 2, block_n // 2
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    num_blocks = triton.cdiv(n, block_n)
    if split_k > 1:
        partial = workspace("skinny_matmul.partial", (2 if gated else 1) * split_k * MAX_ROWS * n, torch.float32,
                            x.device)
        counters = workspace("skinny_matmul.counters", num_blocks, torch.int32, x.device)
    else:
        partial, counters = out, out  # unused
    _skinny_matmul_kernel[(num_blocks, split_k)](
        x, weight, out, partial, counters, num_rows, n, k, x.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=k % (split_k * block_k) == 0, GATED=gated, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# The row count changes with the batch; compiling again for its value class (1, or not) mid-run costs ~0.5 s.
@triton.jit(do_not_specialize=["num_rows"])
def _skinny_matmul_kernel(
    X, W, Out, Partial, Counters, num_rows, n, k, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_valid = offs_m < num_rows
    col_valid = offs_n < n
    k_len = k // SPLIT_K  # the wrapper splits K only into whole tiles
    k_end = (split + 1) * k_len
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # gated only: the up half's columns (n rows further on)
    for k0 in range(split * k_len, k_end, BLOCK_K):
        x_ptrs = X + offs_m[:, None] * stride_x + k0 + offs_k[None, :]
        w_ptrs = W + offs_n[:, None] * k + k0 + offs_k[None, :]
        if EVEN_K:  # no mask along K: the loads stay 16-byte vectors (masked ones measured ~30% slower)
            x_mask, w_mask = row_valid[:, None], col_valid[:, None]
        else:
            k_valid = k0 + offs_k < k_end
            x_mask, w_mask = row_valid[:, None] & k_valid[None, :], col_valid[:, None] & k_valid[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs, mask=w_mask, other=0.0)), acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + n * k, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)
    out_mask = row_valid[:, None] & col_valid[None, :]
    tile = offs_m[:, None] * n + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(Out + tile, _epilogue(acc, acc_up, Out.dtype.element_ty, GATED), mask=out_mask)
    else:
        up_partials = SPLIT_K * BLOCK_M * n  # gated: the up half's partial sums follow the gate half's
        tl.store(Partial + split * BLOCK_M * n + tile, acc, mask=col_valid[None, :])
        if GATED:
            tl.store(Partial + up_partials + split * BLOCK_M * n + tile, acc_up, mask=col_valid[None, :])
        done = tl.atomic_add(Counters + block, 1, sem="acq_rel")  # releases this partial, acquires the others
        if done == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            total_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(Partial + s * BLOCK_M * n + tile, mask=col_valid[None, :], other=0.0,
                                 cache_modifier=".cg")
                if GATED:
                    total_up += tl.load(Partial + up_partials + s * BLOCK_M * n + tile, mask=col_valid[None, :],
                                        other=0.0, cache_modifier=".cg")
            tl.store(Out + tile, _epilogue(total, total_up, Out.dtype.element_ty, GATED), mask=out_mask)
            tl.store(Counters + block, 0)  # ready for the next launch (a CUDA graph replays the same buffer)


@triton.jit
def _epilogue(acc, acc_up, dtype: tl.constexpr, GATED: tl.constexpr):
    """The output tile: the sums rounded to the output dtype, or, gated, silu(gate) * up from those roundings."""
    if GATED:
        out = silu_and_mul_tile(acc.to(dtype), acc_up.to(dtype), dtype)
    else:
        out = acc.to(dtype)
    return out
