"""The sum over tensor-parallel ranks that a row-parallel layer's partial outputs need."""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (torch >= 2.4 has it) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(x: torch.Tensor, tp_size: int, batch_invariant: bool) -> torch.Tensor:
    """`x` [T, ...] summed over the `tp_size` ranks (in place, unless in rank order).

    NCCL and gloo cut a message into chunks by its size and add each chunk's ranks in an order of its own, so
    with 3 or more ranks the order of a row's sum follows the step's row count. In the batch-invariant mode
    (engine/batch_invariance.py) every rank gathers the partials and adds them rank 0 + 1 + 2 + ... elementwise,
    in float32, then rounds once to x's dtype: the same order for every row, and in bf16 one rounding instead of
    the tp_size - 1 of a bf16 all-reduce. Two ranks need none of this: a + b is one addition, in either order.
    """
    if not batch_invariant or tp_size <= 2:
        dist.all_reduce(x)
        return x
    parts = torch.empty((tp_size * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(parts, x.contiguous())  # concatenated along dim 0: gloo takes no stacked output
    parts = parts.view(tp_size, *x.shape)
    total = parts[0].float()
    for part in parts[1:]:
        total += part
    return total.to(x.dtype)
