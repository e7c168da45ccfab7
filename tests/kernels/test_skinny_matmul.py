"""The skinny matmul (decode's linear layers at <= 16 rows) against torch: every configuration the engine picks,
split-K's last-program sum, a row's bits independent of the row count, the counters left ready for a CUDA graph's
next replay, and the gated (SwiGLU) epilogue."""

from __future__ import annotations

import pytest
import torch

from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from kernels.skinny_matmul import MAX_ROWS, skinny_config, skinny_matmul
from kernels.triton_compat import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
# (n, k): Qwen3-0.6B's qkv, o_proj, gate_up and down on a GPU; in the CPU interpreter, small ones that take the
# same paths (unsplit, split in 2 and in 4, a ragged last column block and K tile)
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)] if ON_GPU else [(96, 64), (40, 1024), (72, 520)]


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_torch_and_a_row_is_the_same_at_any_row_count(dtype: torch.dtype, n: int, k: int, split: bool) -> None:
    weight = randn(n, k, dtype=dtype, seed=1) / k**0.5
    x = randn(MAX_ROWS, k, dtype=dtype)
    config = skinny_config(n, k, split)
    full = skinny_matmul(x, weight, config)
    want = x.float() @ weight.float().T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full.float(), want, rtol=tol, atol=tol)
    for rows in (1, 3, 8):
        assert torch.equal(skinny_matmul(x[:rows], weight, config), full[:rows]), f"{rows} rows"


def test_split_k_adds_every_split_and_leaves_its_counters_at_zero() -> None:
    n, k = 40, 1024
    assert skinny_config(n, k)[2] == 4, "this shape splits K four ways"
    weight, x = randn(n, k, dtype=torch.float32, seed=1) / k**0.5, randn(5, k, dtype=torch.float32)
    first = skinny_matmul(x, weight)
    partials = [x[:, s * 256:(s + 1) * 256] @ weight[:, s * 256:(s + 1) * 256].T for s in range(4)]
    torch.testing.assert_close(first, ((partials[0] + partials[1]) + partials[2]) + partials[3], rtol=1e-4, atol=1e-4)
    for _ in range(3):  # a counter left non-zero would make a later launch add too few or too many partials
        assert torch.equal(skinny_matmul(x, weight), first)
    unsplit = skinny_matmul(x, weight, (32, 256, 1))
    torch.testing.assert_close(unsplit, first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_is_silu_and_mul_of_the_plain_matmul_bit_for_bit(dtype: torch.dtype, split: bool) -> None:
    """The gated epilogue rounds as kernels/silu_and_mul.py does: the same bits as that kernel applied to the plain
    matmul's output (both paths of a step, whatever its row count, in the batch-invariant mode)."""
    n, k = (6144, 1024) if ON_GPU else (80, 1024)  # gate_up; on CPU a small one that splits K
    weight = randn(n, k, dtype=dtype, seed=2) / k**0.5
    x = randn(MAX_ROWS, k, dtype=dtype, seed=3) * 4  # gates well into silu's curve, both signs
    config = skinny_config(n, k, split)
    assert ON_GPU or (config[2] > 1) == split
    gated = skinny_matmul(x, weight, config, gated=True)
    assert gated.shape == (MAX_ROWS, n // 2)
    assert torch.equal(gated, silu_and_mul(skinny_matmul(x, weight, config)))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gated.float(), silu_and_mul_ref(x.float() @ weight.float().T), rtol=tol, atol=tol)
    assert torch.equal(skinny_matmul(x[:3], weight, config, gated=True), gated[:3])


def test_the_config_fills_the_gpu_with_whole_k_tiles() -> None:
    assert skinny_config(4096, 1024) == (32, 128, 1)  # qkv: 128 column blocks
    assert skinny_config(6144, 1024) == (64, 128, 1)  # gate_up: 96
    assert skinny_config(1024, 2048) == (32, 256, 4)  # o_proj: 32 blocks x 4 splits
    assert skinny_config(1024, 3072) == (32, 256, 4)  # down
    assert skinny_config(1024, 3072, split=False) == (16, 128, 1)  # the batch-invariant mode: one sum per row
    assert skinny_config(4096, 1024, split=False) == (32, 128, 1)
    for n, k in ((96, 64), (512, 1536), (1000, 1000)):
        _, block_k, split_k = skinny_config(n, k)
        assert split_k == 1 or k % (split_k * block_k) == 0
