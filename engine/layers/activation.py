"""SiLU-gated activation of a merged gate/up projection."""

from __future__ import annotations

import torch
from torch import nn

from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from kernels.triton_compat import use_triton


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * I] as [gate | up] -> silu(gate) * up: [T, I]."""
        return silu_and_mul(x) if use_triton(x) else silu_and_mul_ref(x)
