"""Tensor-parallel-ready linear layers; each parameter carries the `weight_loader` that shards it.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (their partial outputs are summed over the ranks: engine/layers/tp_reduce.py). With
tp_size 1 they are plain linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tp_reduce import all_reduce
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from kernels.skinny_matmul import MAX_ROWS, skinny_matmul
from kernels.triton_compat import use_triton


class LinearBase(nn.Module):
    """A linear layer whose weight is this rank's shard along `tp_dim` (0: output, 1: input)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_dim: int, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.tp_dim, self.tp_rank, self.tp_size = tp_dim, tp_rank, tp_size
        # Set by the model runner: the engine's mode (engine/batch_invariance.py), and the skinny matmul's
        # configuration where it runs the layer's few-row steps (decode at small batches on a GPU), else None
        self.batch_invariant = False
        self.skinny: tuple[int, int, int] | None = None
        shape = (output_size // tp_size, input_size) if tp_dim == 0 else (output_size, input_size // tp_size)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            bias_size = shape[0]
            self.bias = nn.Parameter(torch.empty(bias_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's slice of a full checkpoint tensor into `param`."""
        full_shape = list(param.shape)
        if param.ndim == 2 or self.tp_dim == 0:
            full_shape[0 if param.ndim == 1 else self.tp_dim] *= self.tp_size
        check_shape(loaded, tuple(full_shape))
        dim = 0 if param.ndim == 1 else self.tp_dim
        if param.ndim == 1 and self.tp_dim == 1:  # row-parallel bias is not sharded
            param.data.copy_(loaded)
            return
        size = param.size(dim)
        param.data.copy_(loaded.narrow(dim, self.tp_rank * size, size))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T: a few rows through the skinny Triton matmul (kernels/skinny_matmul.py), which reads the
        weight about 1.6x as fast as cuBLAS there on an H200; more rows, or no skinny config, through cuBLAS."""
        return few_row_matmul(x, self.weight, self.skinny)


def runs_skinny(x: torch.Tensor, skinny: tuple[int, int, int] | None) -> bool:
    """Whether x's rows go through the skinny matmul with config `skinny` (None: never)."""
    return skinny is not None and x.shape[0] <= MAX_ROWS and use_triton(x)


def few_row_matmul(x: torch.Tensor, weight: torch.Tensor, skinny: tuple[int, int, int] | None) -> torch.Tensor:
    """x @ weight.T through the skinny matmul where `runs_skinny`, else cuBLAS (the linear layers and the LM head)."""
    return skinny_matmul(x, weight, skinny) if runs_skinny(x, skinny) else F.linear(x, weight)


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A checkpoint tensor must have exactly the full (unsharded) shape config.json implies."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape {tuple(loaded.shape)} in the checkpoint, {tuple(expected)} expected from config.json")


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, output_size, bias, 0, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one weight (gate and up)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        check_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class GateUpLinear(MergedColumnParallelLinear):
    """A SwiGLU MLP's gate and up projections in one weight, and the product that follows them:
    x -> silu(x @ gate.T) * (x @ up.T). Where the skinny matmul runs, the product is its epilogue (one kernel)."""

    def __init__(self, input_size: int, intermediate_size: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, [intermediate_size, intermediate_size], False, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_skinny(x, self.skinny):
            return skinny_matmul(x, self.weight, self.skinny, gated=True)
        gate_up = F.linear(x, self.weight)
        return silu_and_mul(gate_up) if use_triton(x) else silu_and_mul_ref(gate_up)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one weight; each rank holds its share of query and KV heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = num_kv_heads // tp_size
        output_size = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[str(shard_id)]
        check_shape(loaded, (size * self.tp_size, *param.shape[1:]))
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, output_size, bias, 1, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.tp_size > 1:  # in the batch-invariant mode, the ranks are summed in rank order
            y = all_reduce(y, self.tp_size, self.batch_invariant)
        return y if self.bias is None else y + self.bias
