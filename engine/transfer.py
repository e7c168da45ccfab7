"""Host-to-device copies that do not make the host wait."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`host` (a CPU tensor, or a list made into one of `dtype`) on `device`; copied from pinned memory
    with non_blocking, so the host goes on while the copy runs."""
    tensor = host if isinstance(host, torch.Tensor) else torch.tensor(host, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
