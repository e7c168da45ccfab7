"""Runs the model for a scheduled batch: inputs -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from engine.layers.attention import Attention, AttentionMetadata
from engine.loader import load_weights
from engine.models.qwen3 import Qwen3ForCausalLM
from engine.sampler import Sampler, SamplingBatch
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """Host-built tensors of one step, already on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # [S]: row of each sampling sequence's last token in the step
    sampling_seqs: list[Sequence]


class ModelRunner:
    """Owns the model, its KV cache and the sampler on one device."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.device = config.device
        self.eos_token_ids = eos_token_ids
        with _default_dtype(config.dtype), torch.device(self.device):
            self.model = Qwen3ForCausalLM(config.model_config, config.max_model_len)
        load_weights(self.model, config.model)
        self.sampler = Sampler()
        self.num_kv_blocks = self._allocate_kv_cache()

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprobs | None]]:
        """Compute the batch; return (token id, logprobs) for each sequence that reached its end."""
        inputs = self._prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata)
        if not inputs.sampling_seqs:
            return []
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        assert logits is not None
        return self._sample(logits, inputs.sampling_seqs)

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_indices.append(query_start_loc[-1] - 1)
                sampling_seqs.append(seq)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(tables, torch.int32),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            metadata=metadata,
            sample_indices=self._tensor(sample_indices, torch.int64),
            sampling_seqs=sampling_seqs,
        )

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprobs | None]]:
        batch = SamplingBatch.build(
            params=[seq.params for seq in seqs],
            seeds=[seq.seed for seq in seqs],
            positions=[seq.num_tokens for seq in seqs],
            suppressed=[self._suppressed_tokens(seq) for seq in seqs],
            device=self.device,
        )
        out = self.sampler(logits, batch)
        token_ids: list[int] = out.token_ids.tolist()  # the step's one device -> host sync
        if out.logprobs is None:
            return [(t, None) for t in token_ids]
        assert out.top_token_ids is not None and out.top_logprobs is not None
        chosen, top_ids, top_lps = out.logprobs.tolist(), out.top_token_ids.tolist(), out.top_logprobs.tolist()
        results: list[tuple[int, TokenLogprobs | None]] = []
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            lp = None if n is None else TokenLogprobs(chosen[i], dict(zip(top_ids[i][:n], top_lps[i][:n])))
            results.append((token_ids[i], lp))
        return results

    def _suppressed_tokens(self, seq: Sequence) -> list[int]:
        """Tokens that may not be sampled yet: EOS and stop ids until min_tokens is reached."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        eos = [] if seq.params.ignore_eos else sorted(self.eos_token_ids)
        return eos + list(seq.params.stop_token_ids)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.tensor(data, dtype=dtype, pin_memory=pin).to(self.device, non_blocking=True)

    def _allocate_kv_cache(self) -> int:
        """Allocate one [2, layers, blocks, block_size, kv_heads, head_dim] cache and bind per-layer views."""
        cfg, mcfg = self.config, self.config.model_config
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        num_kv_heads, head_dim = layers[0].num_kv_heads, mcfg.head_dim
        bytes_per_block = 2 * len(layers) * cfg.block_size * num_kv_heads * head_dim * cfg.dtype.itemsize
        num_blocks = cfg.num_kv_blocks or self._default_num_blocks(bytes_per_block)
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV block; lower max_model_len or free memory")
        # On CPU, untouched pages of an empty tensor cost no memory; every slot is written before it is read.
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        shape = (2, len(layers), num_blocks, cfg.block_size, num_kv_heads, head_dim)
        cache = alloc(shape, dtype=cfg.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
        self.kv_cache = cache
        log.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB) on %s",
            num_blocks, cfg.block_size, num_blocks * bytes_per_block / 2**20, self.device,
        )
        return num_blocks

    def _default_num_blocks(self, bytes_per_block: int) -> int:
        cfg = self.config
        if self.device.type == "cpu":
            wanted = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
            return min(wanted, CPU_KV_CACHE_BYTES // bytes_per_block)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
        return int(budget // bytes_per_block)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (set and restored in this one place)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
