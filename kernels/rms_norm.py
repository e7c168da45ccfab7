"""RMSNorm, optionally fused with the residual add before it: one pass over each row.

Rounding follows the unfused torch code (Hugging Face's Qwen3RMSNorm): the residual sum is
rounded to the input dtype, normalised in float32, rounded back, then scaled by the weight.
"""

from __future__ import annotations

import torch

from kernels.triton_compat import tl, triton


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`: norm(x), or (norm(x + residual), x + residual)."""
    num_rows, hidden = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else out
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, residual_out, x.stride(0),
        residual.stride(0) if residual is not None else 0, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
    )
    return out if residual is None else (out, residual_out)


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, R_out, stride_x, stride_r, hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(Out.dtype.element_ty)
        tl.store(R_out + row * hidden + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    y = (xf * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * hidden + offs, (y * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with a residual: (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, x)
