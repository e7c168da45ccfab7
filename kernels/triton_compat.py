"""Triton when it is installed; otherwise a no-op `triton.jit`, so kernel modules still import and
their torch references work on machines without Triton (the kernels themselves need a GPU, or
TRITON_INTERPRET=1, which the tests set on CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        @staticmethod
        def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels can run on `tensor` (a CUDA tensor, with Triton installed)."""
    return HAS_TRITON and tensor.is_cuda


__all__ = ["HAS_TRITON", "tl", "triton", "use_triton"]
