"""Fused RMSNorm(+residual), q/k-norm + rotary + KV store and SiLU-and-mul against their torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_kv import quantize_ref
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rotary_kv_store import rotary_kv_store, rotary_kv_store_ref
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from kernels.triton_compat import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Same roundings as the reference: equal up to float32 arithmetic order.
    assert not out.isnan().any()
    tol = 1e-5 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,hidden", [(1, 64), (7, 1024), (33, 100)])
def test_rms_norm(dtype: torch.dtype, num_rows: int, hidden: int) -> None:
    x, residual = randn(num_rows, hidden, dtype=dtype), randn(num_rows, hidden, dtype=dtype, seed=1)
    weight = randn(hidden, dtype=dtype, seed=2)
    assert_matches(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-6, residual)
    assert_matches(out, ref_out)
    assert_matches(new_residual, ref_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "rope-only"])  # Qwen3, Qwen2
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,num_tokens",
                         [(4, 2, 64, 9), (16, 8, 128, 9), (2, 2, 16, 9), (6, 3, 32, 9), (4, 2, 16, 1030)])
def test_rotary_kv_store(
    dtype: torch.dtype, norm: bool, num_heads: int, num_kv_heads: int, head_dim: int, num_tokens: int
) -> None:
    """Short and long steps; 1, 2 or 8 heads per program (the most, up to 8, that divides both head counts)."""
    max_position, page = 64, 4
    num_blocks = num_tokens // page + 1
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, max_position, (num_tokens,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * page, generator=g)[:num_tokens]
    slots[4] = -1  # padding: its key and value must not be stored
    slots = slots.to(DEVICE)
    angles = torch.outer(torch.arange(max_position).float(), torch.rand(head_dim // 2) * 0.5)
    cos, sin = torch.cat([angles, angles], -1).cos().to(DEVICE), torch.cat([angles, angles], -1).sin().to(DEVICE)
    weights = (randn(head_dim, dtype=dtype, seed=4), randn(head_dim, dtype=dtype, seed=5)) if norm else (None, None)
    caches = [torch.full((num_blocks, page, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(4)]  # poisoned: exactly the stored slots change
    args = (qkv, positions, *weights, cos, sin, 1e-6, num_heads, num_kv_heads)
    q, q_ref = rotary_kv_store(*args, *caches[:2], slots), rotary_kv_store_ref(*args, *caches[2:], slots)
    assert q.shape == (num_tokens, num_heads, head_dim)
    assert_matches(q, q_ref)
    stored = slots[slots >= 0]
    for cache, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat, flat_ref = cache.view(-1, num_kv_heads, head_dim), ref.view(-1, num_kv_heads, head_dim)
        assert_matches(flat[stored], flat_ref[stored])
        assert flat.isnan().all(dim=(1, 2)).sum() == num_blocks * page - len(stored)
    values = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    torch.testing.assert_close(caches[1].view(-1, num_kv_heads, head_dim)[stored], values[slots >= 0], rtol=0, atol=0)
    if not norm:  # rotation keeps each half-pair's length: the heads were not normalised
        q_in = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim).float()
        torch.testing.assert_close(q.float().norm(dim=-1), q_in.norm(dim=-1), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kv_store_into_an_fp8_cache(dtype: torch.dtype) -> None:
    """Keys and values divided by their head's scale, rounded to e4m3 and clamped into its range (a scale too small
    for a value must not make it NaN): on a GPU, bitwise as torch rounds the kernel's own keys and values (those it
    stores into a cache of the model's dtype; the torch reference's differ from them in float32 summation order).
    Triton 3.9's CPU interpreter gets e4m3 wrong (values rounding up to a power of two lose half: -127.99 -> -64;
    subnormals flush to 0), so there only the queries and the stored slots are checked; the CPU engine stores
    through the torch reference."""
    num_heads, num_kv_heads, head_dim, num_tokens, page = 4, 2, 64, 9, 4
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype) * 3
    positions = torch.arange(num_tokens, device=DEVICE)
    slots = torch.randperm(4 * page, generator=torch.Generator().manual_seed(3))[:num_tokens].to(DEVICE)
    angles = torch.outer(torch.arange(16).float(), torch.rand(head_dim // 2) * 0.5)
    cos, sin = torch.cat([angles, angles], -1).cos().to(DEVICE), torch.cat([angles, angles], -1).sin().to(DEVICE)
    weights = (randn(head_dim, dtype=dtype, seed=4), randn(head_dim, dtype=dtype, seed=5))
    scales = (torch.tensor([0.02, 0.05], device=DEVICE), torch.tensor([0.03, 0.004], device=DEVICE))  # v head 1 clamps
    caches = [torch.zeros(4, page, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(4)]
    unquantised = [torch.zeros(4, page, num_kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    args = (qkv, positions, *weights, cos, sin, 1e-6, num_heads, num_kv_heads)
    q = rotary_kv_store(*args, *caches[:2], slots, scales)
    q_ref = rotary_kv_store_ref(*args, *caches[2:], slots, scales)
    rotary_kv_store(*args, *unquantised, slots)
    assert_matches(q, q_ref)
    for cache, ref, before, scale in zip(caches[:2], caches[2:], unquantised, scales):
        stored = torch.zeros(cache.shape[:2], dtype=torch.bool, device=DEVICE)
        stored.view(-1)[slots] = True
        for c in (cache, ref):
            assert (c.float() != 0).any(dim=(2, 3)).eq(stored).all() and not c.float().isnan().any()
        if ON_GPU:
            assert torch.equal(cache.float(), quantize_ref(before, scale[:, None]).float())
    assert (caches[3].float().abs() == 448).any(), "the clamped head reached e4m3's top"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,size", [(1, 128), (5, 3072), (3, 1500)])
def test_silu_and_mul(dtype: torch.dtype, num_rows: int, size: int) -> None:
    x = randn(num_rows, 2 * size, dtype=dtype)
    assert_matches(silu_and_mul(x), silu_and_mul_ref(x))
