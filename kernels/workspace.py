"""Per-device buffers that kernels keep from launch to launch: the skinny matmul's split-K partial sums and the
counters that say which program of a split finishes last (each launch leaves its counters at zero for the next).

A buffer is sized by the first launches that need it, which run before a CUDA graph captures (its warm-up runs
the same shapes first, the largest first), so a captured graph never sees one reallocated.
"""

from __future__ import annotations

import torch

_buffers: dict[tuple[str, torch.device], torch.Tensor] = {}


def workspace(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer `name` on `device`, at least `size` elements of `dtype`; a new or grown one starts at zero."""
    buffer = _buffers.get((name, device))
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = torch.zeros(max(size, 0 if buffer is None else buffer.numel()), dtype=dtype, device=device)
        _buffers[name, device] = buffer
    return buffer
