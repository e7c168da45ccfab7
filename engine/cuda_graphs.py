"""Decode steps on fixed batch sizes: CUDA graphs captured once per size, replayed with padding.

A decode step launches hundreds of small kernels; replaying a captured graph removes their
launch cost. Inputs live in static buffers that each step overwrites; a batch of n sequences
runs at the smallest size >= n, its extra rows padded so they do nothing (no query tokens, K/V
slot -1). With `enforce_eager` the same padded forward runs without a graph, so eager and graph
steps do the same arithmetic (same matrix shapes, same KV splits) and give the same tokens.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch
from torch import nn

from engine.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """Padded decode forwards, captured as CUDA graphs unless `capture` is False (model only: logits
    and sampling run after the replay)."""

    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_kv_splits: Callable[[int], int],
        capture: bool = True,
    ) -> None:
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.int64)
            self.positions = torch.zeros(n, dtype=torch.int64)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.int64)
            self.query_start_loc = torch.zeros(n + 1, dtype=torch.int32)
            self.seq_lens = torch.zeros(n, dtype=torch.int32)
            self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32)
            self.hidden = torch.zeros(n, hidden_size, dtype=dtype)
        self.model = model
        self.metadata = {size: self._metadata(size, num_kv_splits(size)) for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for size in reversed(self.sizes) if capture else ():  # largest first: smaller graphs reuse its pool
            self._forward(size)  # warm-up: compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        if capture:
            log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def release(self) -> None:
        """Destroy the captured graphs. Do this before tearing NCCL down: a communicator whose collectives a
        live graph captured cannot be destroyed (the teardown hangs: pytorch/pytorch#115388)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def _metadata(self, size: int, num_splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            num_splits=num_splits,
        )

    def _forward(self, size: int) -> None:
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], self.metadata[size])

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a decode batch of `num_seqs` would replay, or None if it is too big."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Run a decode batch (one token per sequence) at its padded size; returns hidden [n, H]."""
        n = input_ids.shape[0]
        size = self.padded_size(n)
        assert size is not None and metadata.max_query_len == 1
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.query_start_loc[: n + 1].copy_(metadata.query_start_loc)
        self.query_start_loc[n + 1 : size + 1].fill_(n)  # padded rows have no query tokens
        self.seq_lens[:n].copy_(metadata.seq_lens)
        self.block_tables[:n, : metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        if self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.hidden[:n]
