"""Triton where one of its kernels can run; otherwise a no-op `triton.jit`, so kernel modules still import and
their torch references work.

A Triton kernel runs on a CUDA GPU, in Triton's CPU interpreter (TRITON_INTERPRET=1, which the tests set on
CPU) or through Triton's compiler alone (TRITON_INTERPRET=0: the sm_90 compile check). Anywhere else Triton is
not imported at all, so the CLIs, the router and CPU replicas neither pay for it nor carry its native objects.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch


def _triton_can_run() -> bool:
    """Whether a Triton kernel can run in this process: a CUDA GPU, or TRITON_INTERPRET set (to any value)."""
    return "TRITON_INTERPRET" in os.environ or torch.cuda.is_available()


class _NoTriton:
    @staticmethod
    def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        return fn if fn is not None else (lambda f: f)


HAS_TRITON = _triton_can_run() and importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl

    # LLMEngine calls gc.freeze(), which moves every object alive then, Triton's modules among them, to the
    # permanent generation: the interpreter's last collections at exit never scan it, so the reference cycles
    # holding Triton's nanobind objects are never freed and nanobind reports them all as leaks (~30 lines).
    # Unfreezing at exit lets those collections free them.
    atexit.register(gc.unfreeze)
else:
    triton = _NoTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels can run on `tensor` (a CUDA tensor, with Triton installed)."""
    return HAS_TRITON and tensor.is_cuda


__all__ = ["HAS_TRITON", "tl", "triton", "use_triton"]
