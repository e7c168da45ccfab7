"""Runs the model for a scheduled batch: inputs -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.batch_invariance import skinny_matmul_matches_cublas
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.heartbeat import Heartbeat
from engine.kv_cache import allocate_kv_cache, bytes_per_block, log_kv_cache, num_cpu_blocks, num_gpu_blocks
from engine.layers.attention import AttentionMetadata
from engine.layers.embed_head import ParallelLMHead
from engine.layers.linear import LinearBase
from engine.loader import load_weights
from engine.models.qwen import QwenForCausalLM
from engine.pending_samples import PendingSamples
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs
from engine.step_plan import StepPlan
from engine.token_mask import TokenMask
from engine.tp.channel import Method
from engine.transfer import arrays_to_device, to_device
from kernels.paged_attention import decode_kv_splits
from kernels.skinny_matmul import skinny_config
from kernels.triton_compat import HAS_TRITON

if TYPE_CHECKING:
    from engine.tp.group import RankGroup

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LaunchedStep:
    """A step whose forward is queued: its sampling sequences, their logits and sampling inputs (None: none samples)."""

    seqs: list[Sequence]
    logits: torch.Tensor | None  # [S, V] on the device
    sampling: SamplingBatch | None


class ModelRunner:
    """Owns the model, its KV cache and the sampler on one device."""

    def __init__(
        self, config: EngineConfig, eos_token_ids: frozenset[int], rank: int = 0, ranks: RankGroup | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        """`rank` is this process's tensor-parallel rank; on rank 0 of a TP group, `ranks` drives the others.
        `heartbeat` beats after each layer of a forward (see engine/heartbeat.py)."""
        self.config = config
        self.device = config.device
        self.eos_token_ids = eos_token_ids
        self.rank, self.ranks = rank, ranks
        tp_size = config.tensor_parallel_size
        with _default_dtype(config.dtype), torch.device(self.device):
            self.model = QwenForCausalLM(config.model_config, config.max_model_len, rank, tp_size)
        self._choose_matmuls([m for m in self.model.modules() if isinstance(m, LinearBase)], self.model.lm_head)
        load_weights(self.model, config.model)
        if heartbeat is not None:
            self.model.model.on_layer_done = heartbeat.beat
        self.sampler = Sampler()
        on_gpu = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if on_gpu else 1
        self.num_kv_blocks = self._setup_kv_cache()
        # The latest step's sampled tokens [S], on the device, where the next step reads its pending tokens; on
        # rank 0, the row of each of its sequences there.
        self._last_sampled: torch.Tensor | None = None
        self._last_sampled_rows: dict[Sequence, int] = {}
        self._sampled_buffer = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)  # ranks > 0
        self.graphs: DecodeGraphs | None = None  # decode at fixed, padded batch sizes (GPU only)
        if on_gpu:
            self.graphs = DecodeGraphs(
                self.model, config.max_num_seqs, -(-config.max_model_len // config.block_size),
                config.model_config.hidden_size, config.dtype, self.device, self._num_kv_splits,
                capture=not config.enforce_eager,
            )

    def close(self) -> None:
        """Free the device memory now (captured graphs first, then the KV cache and the weights) instead of
        whenever the engine is collected; the runner is unusable afterwards."""
        if self.graphs is not None:
            self.graphs.release()
        del self.graphs, self.kv_cache, self.model, self._last_sampled, self._last_sampled_rows
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the batch's forward on every rank and its sampling inputs; `sample` then queues the sampling.

        Nothing here waits for the device, so the host can plan the next step while this one runs.
        """
        plan, sampling_seqs = StepPlan.build(batch, self.config.block_size, self._last_sampled_rows)
        with self._rank_failures():
            if self.ranks is not None:
                self.ranks.send(Method.RUN, [plan.max_query_len], plan.arrays())
            logits = self.execute(plan)
        if logits is None:
            return LaunchedStep(sampling_seqs, None, None)
        return LaunchedStep(sampling_seqs, logits, self._sampling_batch(sampling_seqs))

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, token_mask: TokenMask | None = None) -> PendingSamples:
        """Queue the sampling of a launched step, under `token_mask` (structured output's rows); the tokens stay on
        the device for the next step and start their way to the host. Call it before the next `launch`."""
        if step.logits is None:
            return PendingSamples.none()
        assert step.sampling is not None
        batch = step.sampling if token_mask is None else dataclasses.replace(step.sampling, token_mask=token_mask)
        with self._rank_failures():
            out = self.sampler(step.logits, batch)
            self._last_sampled = out.token_ids
            self._last_sampled_rows = {seq: row for row, seq in enumerate(step.seqs)}
            if self.ranks is not None:
                dist.broadcast(out.token_ids, src=0)
        return PendingSamples.start(step.seqs, out)

    def wait(self, pending: PendingSamples) -> list[tuple[int, TokenLogprobs | None]]:
        """A launched step's (token id, logprobs) per sampling sequence, once the device has them."""
        with self._rank_failures():
            return pending.results()

    @contextlib.contextmanager
    def _rank_failures(self) -> Iterator[None]:
        """A rank's death, seen as a RuntimeError of a collective, becomes a RankDiedError naming it."""
        try:
            yield
        except RuntimeError as e:
            if self.ranks is not None:
                self.ranks.fail(e)
            raise

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward of one step (the part every rank runs): logits [S, V] of the sampling rows on
        rank 0; None on other ranks and when no row samples."""
        (input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables, sample_indices,
         pending_indices, pending_rows) = arrays_to_device(plan.arrays(), self.device)
        if len(plan.pending_indices):
            input_ids = input_ids.index_copy(0, pending_indices, self._previous_tokens(pending_rows))
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            max_query_len=plan.max_query_len,
            num_splits=1,  # prefill and mixed steps; decode steps take their split count from DecodeGraphs
        )
        num_seqs = len(plan.seq_lens)
        if self.graphs is not None and plan.max_query_len == 1 and self.graphs.padded_size(num_seqs):
            hidden = self.graphs.replay(input_ids, positions, metadata)
        else:
            hidden = self.model(input_ids, positions, metadata)
        num_samples = len(plan.sample_indices)
        if num_samples == 0:
            return None
        logits = self.model.compute_logits(hidden[sample_indices])
        if self.rank > 0:  # rank 0 samples and broadcasts the tokens: the next step's pending tokens are among them
            self._last_sampled = self._sampled_buffer[:num_samples]
            dist.broadcast(self._last_sampled, src=0)
        return logits

    def _previous_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The latest step's sampled tokens at `rows` (on the device), gathered there: the host never waits."""
        assert self._last_sampled is not None, "a pending token, but no step has sampled yet"
        return self._last_sampled[rows]

    def _choose_matmuls(self, linears: list[LinearBase], lm_head: ParallelLMHead) -> None:
        """Each linear layer's and the LM head's matmul for a few rows on a GPU (the skinny Triton kernel, or
        cuBLAS) and the linear layers' sum over the ranks, in the engine's mode."""
        invariant = self.config.batch_invariant
        skinny = self.device.type == "cuda" and HAS_TRITON
        if skinny and invariant:
            shapes = {tuple(layer.weight.shape) for layer in [*linears, lm_head]}
            skinny = skinny_matmul_matches_cublas(shapes, self.config.dtype, self.device)  # type: ignore[arg-type]
        for layer in [*linears, lm_head]:
            layer.skinny = skinny_config(*layer.weight.shape, split=not invariant) if skinny else None
        for layer in linears:
            layer.batch_invariant = invariant

    def _num_kv_splits(self, batch_size: int) -> int:
        if self.config.batch_invariant:  # a split count that follows the batch would change the sums' order
            return 1
        return decode_kv_splits(batch_size, self.config.model_config.num_key_value_heads, self.num_sms)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """The sampling inputs of `seqs`, on their way to the device (built when their step launches)."""
        batch = SamplingBatch.build(
            params=[seq.params for seq in seqs],
            seeds=[seq.seed for seq in seqs],
            positions=[seq.num_tokens for seq in seqs],
            suppressed=[self._suppressed_tokens(seq) for seq in seqs],
            device=self.device,
            histories=[seq.penalty_history() if seq.params.has_penalties else None for seq in seqs],
        )
        if batch.penalties is not None:  # a penalised output may end with the previous step's pending token
            rows = [i for i, seq in enumerate(seqs) if seq.num_pending and seq.params.has_penalties]
            if rows:
                previous = self._previous_tokens(to_device([self._last_sampled_rows[seqs[i]] for i in rows],
                                                           self.device, torch.int64))
                batch = batch.with_output_tokens(rows, previous)
        return batch

    def _suppressed_tokens(self, seq: Sequence) -> list[int]:
        """Tokens that may not be sampled yet: EOS and stop ids until min_tokens is reached."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        eos = [] if seq.params.ignore_eos else sorted(self.eos_token_ids)
        vocab_size = self.config.model_config.vocab_size  # a tokenizer's EOS may lie outside a small model's vocab
        return [t for t in eos if t < vocab_size] + list(seq.params.stop_token_ids)

    def _setup_kv_cache(self) -> int:
        """Size the KV cache (profiling the largest step on a GPU), allocate it; return its block count."""
        cfg = self.config
        block_bytes = bytes_per_block(self.model, cfg)
        # On a GPU the profiling step runs even for a given block count: it compiles the kernels a prefill needs
        # now, not under the first request (~0.7 s and, in the process, ~300 MiB of compiler memory).
        peak_activation_bytes = self._profile_peak_activation_bytes() if self.device.type == "cuda" else 0
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif self.device.type == "cpu":
            num_blocks = num_cpu_blocks(cfg, block_bytes)
        else:
            num_blocks = num_gpu_blocks(cfg, block_bytes, peak_activation_bytes)
        if cfg.tensor_parallel_size > 1:  # every rank must hold the same blocks: agree on the smallest count
            count = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
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
        if logits is not None:  # rank 0 samples
            hungriest = SamplingParams(temperature=1.0, top_p=0.9, logprobs=20, presence_penalty=0.5,
                                       repetition_penalty=1.1)  # every [rows, vocab] intermediate the sampler has
            self.sampler(logits, SamplingBatch.build(
                [hungriest] * cfg.max_num_seqs, seeds=[0] * cfg.max_num_seqs, positions=[0] * cfg.max_num_seqs,
                suppressed=[[]] * cfg.max_num_seqs, device=self.device, histories=[([1], [2])] * cfg.max_num_seqs,
            ))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del scratch_cache, hidden, logits
        torch.cuda.empty_cache()
        return peak


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (set and restored in this one place)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
