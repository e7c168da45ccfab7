"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import check_shape, few_row_matmul


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.vocab_size = tp_rank, tp_size, vocab_size
        self.shard_size = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's rows; the last rank's padding rows (vocab not divisible by tp) are zeroed."""
        check_shape(loaded, (self.vocab_size, param.shape[1]))
        rows = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data.zero_()
        param.data[: rows.size(0)].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        dist.all_reduce(y)  # exact in any order, so batch-invariant: one rank holds a token's row, the rest add 0
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; with tp > 1 the shards are gathered on rank 0 (others get None)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(vocab_size, hidden_size, tp_rank, tp_size)
        self.skinny: tuple[int, int, int] | None = None  # as LinearBase.skinny (the model runner sets both)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = few_row_matmul(hidden, self.weight, self.skinny)  # skinny: 72 against cuBLAS's 84 us at 1 row (H200)
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, shards, dst=0)
        return torch.cat(shards, dim=-1)[:, : self.vocab_size] if shards is not None else None
