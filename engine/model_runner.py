"""Runs the model for a scheduled batch: inputs -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import allocate_kv_cache, bytes_per_block, log_kv_cache, num_cpu_blocks, num_gpu_blocks
from engine.layers.attention import AttentionMetadata
from engine.loader import load_weights
from engine.models.qwen3 import Qwen3ForCausalLM
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs
from engine.transfer import to_device

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
        on_gpu = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if on_gpu else 1
        self.num_kv_blocks = self._setup_kv_cache()
        self.graphs: DecodeGraphs | None = None  # decode at fixed, padded batch sizes (GPU only)
        if on_gpu:
            self.graphs = DecodeGraphs(
                self.model, config.max_num_seqs, -(-config.max_model_len // config.block_size),
                config.model_config.hidden_size, config.dtype, self.device, self._num_kv_splits,
                capture=not config.enforce_eager,
            )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprobs | None]]:
        """Compute the batch; return (token id, logprobs) for each sequence that reached its end."""
        inputs = self._prepare(batch)
        if self.graphs is not None and inputs.metadata.max_query_len == 1 and self.graphs.padded_size(len(batch)):
            hidden = self.graphs.replay(inputs.input_ids, inputs.positions, inputs.metadata)
        else:
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
        query_start_loc = [0, *itertools.accumulate(batch.num_new_tokens)]
        seq_lens: list[int] = []
        sample_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            if n == 1:  # decode: the common case, kept cheap
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += seq.token_ids[start:end]
                positions += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_indices.append(query_start_loc[i + 1] - 1)
                sampling_seqs.append(seq)
        metadata = AttentionMetadata(
            slot_mapping=to_device(slots, self.device, torch.int64),
            query_start_loc=to_device(query_start_loc, self.device, torch.int32),
            seq_lens=to_device(seq_lens, self.device, torch.int32),
            block_tables=to_device(_pad_block_tables([seq.block_table for seq in batch.seqs]), self.device),
            max_query_len=max(batch.num_new_tokens),
            num_splits=1,  # prefill and mixed steps; decode steps take their split count from DecodeGraphs
        )
        return StepInputs(
            input_ids=to_device(input_ids, self.device, torch.int64),
            positions=to_device(positions, self.device, torch.int64),
            metadata=metadata,
            sample_indices=to_device(sample_indices, self.device, torch.int64),
            sampling_seqs=sampling_seqs,
        )

    def _num_kv_splits(self, batch_size: int) -> int:
        """Flash-decoding splits for a decode batch: enough programs to fill the GPU (at most 16)."""
        programs = batch_size * self.config.model_config.num_key_value_heads  # one per (sequence, KV head)
        splits = 1
        while splits < 16 and programs * splits < 2 * self.num_sms:
            splits *= 2
        return splits

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

    def _setup_kv_cache(self) -> int:
        """Size the KV cache (profiling the largest step on a GPU), allocate it; return its block count."""
        cfg = self.config
        block_bytes = bytes_per_block(self.model, cfg)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif self.device.type == "cpu":
            num_blocks = num_cpu_blocks(cfg, block_bytes)
        else:
            num_blocks = num_gpu_blocks(cfg, block_bytes, self._profile_peak_activation_bytes())
        if num_blocks < 1:
            raise ValueError(
                "KV cache: no room for a single block; raise gpu_memory_utilization, "
                "or lower max_num_batched_tokens / max_num_seqs"
            )
        self.kv_cache = allocate_kv_cache(self.model, cfg, num_blocks)
        log_kv_cache(cfg, num_blocks, block_bytes)
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """Run the largest step the scheduler can form (max_num_batched_tokens of prefill, then logits and
        sampling for max_num_seqs rows) on dummy data; return its peak memory beyond what is held now."""
        cfg = self.config
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        seq_len = min(num_tokens, cfg.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // cfg.block_size)
        scratch_cache = allocate_kv_cache(self.model, cfg, num_seqs * blocks_per_seq)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(
                num_seqs, blocks_per_seq
            ),
            max_query_len=seq_len,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        hidden = self.model(input_ids, positions, metadata)
        rows = hidden[-1:].expand(cfg.max_num_seqs, -1)
        logits = self.model.compute_logits(rows)
        assert logits is not None
        self.sampler(logits, SamplingBatch.build(
            [SamplingParams(temperature=1.0, top_p=0.9, logprobs=20)] * cfg.max_num_seqs,
            seeds=[0] * cfg.max_num_seqs, positions=[0] * cfg.max_num_seqs,
            suppressed=[[]] * cfg.max_num_seqs, device=self.device,
        ))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del scratch_cache, hidden, logits
        torch.cuda.empty_cache()
        return peak


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one zero-padded [B, max_blocks] int32 tensor (numpy: ~2x faster than nested lists)."""
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    padded = np.zeros((len(tables), int(lengths.max())), np.int32)
    padded[np.arange(padded.shape[1])[None, :] < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), np.int32, int(lengths.sum())
    )
    return torch.from_numpy(padded)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (set and restored in this one place)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
