"""Host-to-device copies that do not make the host wait."""

from __future__ import annotations

import functools

import numpy as np
import torch

ALIGNMENT = 16  # bytes: each packed array starts where a Triton kernel may take it as 16-byte aligned


def to_device(host: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`host` (a CPU tensor, or a list made into one of `dtype`) on `device`; copied from pinned memory
    with non_blocking, so the host goes on while the copy runs."""
    tensor = host if isinstance(host, torch.Tensor) else torch.tensor(host, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Many small host arrays on `device` in one copy: packed into one pinned byte buffer, each at a 16-byte
    aligned offset, moved with one non_blocking copy, and viewed back there with their dtypes and shapes.

    A step's inputs are a dozen arrays of a few KB: copied one by one, the host's work per copy (pinning,
    launching) cost more than the copies (about 50 us each on the H200 machine's host). On CPU the views share
    the packed buffer, so the tests run the packing too."""
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // ALIGNMENT) * ALIGNMENT
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    packed = staging.numpy()
    for array, offset in zip(arrays, offsets):
        packed[offset : offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    moved = staging.to(device, non_blocking=True)
    return [
        moved[offset : offset + array.nbytes].view(_torch_dtype(array.dtype)).view(array.shape)
        for array, offset in zip(arrays, offsets)
    ]


@functools.cache  # on every step's path
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
