"""SiLU-gated product of a merged gate/up projection: [T, 2I] -> silu(gate) * up, [T, I], in one pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton_compat import tl, triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] as [gate | up]
    """Triton version of `silu_and_mul_ref` (same roundings: silu, then the product)."""
    num_rows, width = x.shape
    size = width // 2
    assert x.stride(-1) == 1
    out = torch.empty(num_rows, size, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(size, block))](x, out, x.stride(0), size, BLOCK=block)
    return out


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + size + offs, mask=mask, other=0.0)
    tl.store(Out + row * size + offs, silu_and_mul_tile(gate, up, Out.dtype.element_ty), mask=mask)


@triton.jit
def silu_and_mul_tile(gate, up, dtype: tl.constexpr):
    """silu(gate) * up for tiles in `dtype`, rounded as torch rounds them (also the gated skinny matmul's epilogue)."""
    gate = gate.to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
