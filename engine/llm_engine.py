"""LLMEngine: the offline API (`generate`) and the streaming core (`add_request` / `step`)."""

from __future__ import annotations

import gc
import itertools
import logging
import random
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.batch_invariance import disable_cublas_split_k
from engine.block_manager import BlockManager, KVEvents
from engine.choices import Requests
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.grammar import Grammars
from engine.heartbeat import Heartbeat
from engine.invalid_request import InvalidRequest
from engine.model_runner import LaunchedStep, ModelRunner
from engine.outputs import EngineStats, RequestOutput, Result, result
from engine.pending_samples import PendingSamples
from engine.progress import step_until_finished
from engine.prompt import Prompt, validate_prompt
from engine.sampling_params import SamplingParams, choice_seed
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.stopping import check_stop, finishes_by_length
from engine.tokenizer import Tokenizer
from engine.tp.group import RankGroup
from engine.tp.rank import run_rank

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlightStep:
    """A launched step whose tokens the host has not read yet."""

    forward: LaunchedStep
    pending: PendingSamples | None  # None until sampled: a step with grammar rows samples after the step before
    counted: list[bool]  # per sampling row: its token is in its sequence's num_pending (not a last one by length)
    chunks: list[Sequence]  # the batch's prefill chunks that sample nothing (committed on their own)


class LLMEngine:
    """A Qwen3 engine on one device: paged KV cache, prefix cache, continuous batching."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tensor_parallel_size: int = 1,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enforce_eager: bool = False,
        batch_invariant: bool = False,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        device: str = "auto",
        generation_config: str = "auto",
    ) -> None:
        """Load `model` and size the KV cache; a bad argument raises ValueError naming it.

        The parameters and defaults are EngineConfig.create's (their one definition; a test keeps them equal).

        model: a checkpoint directory or a Hugging Face model id (found in the Hugging Face cache, downloaded
            into it when missing). None: the embedded tiny Qwen3 with RANDOM weights (gibberish text; a
            warning says so), built on first use: a check that the engine runs here, as `python -m engine`.
        tensor_parallel_size: split the model over this many GPUs of the host (processes over gloo on CPU).
        max_num_batched_tokens: most tokens computed in one step (prefill chunks plus decodes); None: 8192 on a
            GPU, 2048 on CPU, where a step of 8192 prompt tokens would hold every other request for many seconds.
        max_num_seqs: most requests in one step's batch.
        max_model_len: longest prompt plus output, in tokens; None: the model's context length.
        gpu_memory_utilization: fraction of the GPU's total memory this engine may use: weights, activations,
            and the KV cache in what they leave. Other processes on the GPU do not count against it, so engines
            sharing a GPU each get their own fraction (one starting waits up to 60 s for memory another still holds).
        block_size: tokens per KV cache block (a power of two <= 256), the unit of the prefix cache.
        num_kv_blocks: KV cache size in blocks; None: sized by gpu_memory_utilization on GPU; on CPU, room for
            max_num_seqs sequences of max_model_len tokens, at most 1 GiB.
        enforce_eager: run decode steps eagerly instead of replaying CUDA graphs (GPU only).
        batch_invariant: on a GPU, make every token's logits bitwise independent of the batch around it (batch
            size and makeup, chunking, prefix hits, graphs or eager, a resumed request), so a request re-run
            or moved to another replica yields the same tokens; see engine/batch_invariance.py. CPU runs are
            invariant already.
        dtype: "auto" (the checkpoint's; float32 on CPU), "float32", "bfloat16" or "float16".
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" (also "fp8_e4m3"): keys and values stored in 8 bits,
            e4m3 with a scale per layer and KV head that no input can exceed (engine/kv_scales.py): twice the
            tokens in the same memory, and half the bytes a decode step reads from the cache, for a small error
            (README, "FP8 KV cache").
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        generation_config: "auto": the checkpoint's generation_config.json sets the sampling defaults
            (temperature, top_p, top_k, min_p, repetition_penalty) of requests that leave them unset, as in vLLM;
            "vllm": SamplingParams' own defaults. `default_sampling_params()` shows them.
        """
        if batch_invariant:  # before anything runs on the GPU (and before the rank processes start)
            disable_cublas_split_k()
        config = EngineConfig.create(
            model, tensor_parallel_size=tensor_parallel_size, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size, num_kv_blocks=num_kv_blocks, enforce_eager=enforce_eager,
            batch_invariant=batch_invariant, dtype=dtype, kv_cache_dtype=kv_cache_dtype, device=device,
            generation_config=generation_config,
        )
        tokenizer = Tokenizer.from_dir(config.model)
        eos_token_ids = _eos_token_ids(config, tokenizer)
        ranks = RankGroup(config, eos_token_ids, run_rank) if config.tensor_parallel_size > 1 else None
        heartbeat = Heartbeat()  # beats through every step, after each layer (see engine/heartbeat.py)
        try:
            model_runner = ModelRunner(config, eos_token_ids, ranks=ranks, heartbeat=heartbeat)
        except BaseException as e:
            if ranks is not None:
                ranks.fail(e)
            raise
        scheduler = Scheduler(BlockManager(model_runner.num_kv_blocks, config.block_size), config.max_num_seqs,
                              config.max_num_batched_tokens)
        self._assemble(config, tokenizer, eos_token_ids, model_runner, scheduler, heartbeat, ranks)

    @classmethod
    def from_parts(
        cls, config: EngineConfig, tokenizer: Tokenizer, model_runner: ModelRunner, scheduler: Scheduler, *,
        heartbeat: Heartbeat | None = None, ranks: RankGroup | None = None,
    ) -> LLMEngine:
        """An engine of parts built elsewhere, such as a benchmark's stand-in model runner; `LLMEngine(model, ...)`
        builds them from its arguments. The engine owns them from then on: close() closes the model runner and the
        ranks. `heartbeat`: the one the model runner beats (None: a new one)."""
        engine = cls.__new__(cls)
        engine._assemble(config, tokenizer, _eos_token_ids(config, tokenizer), model_runner, scheduler,
                         heartbeat or Heartbeat(), ranks)
        return engine

    def _assemble(
        self, config: EngineConfig, tokenizer: Tokenizer, eos_token_ids: frozenset[int], model_runner: ModelRunner,
        scheduler: Scheduler, heartbeat: Heartbeat, ranks: RankGroup | None,
    ) -> None:
        """The engine around its parts, with no request yet (both constructors end here)."""
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.ranks = ranks
        self.heartbeat = heartbeat
        self.model_runner = model_runner
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.grammars = Grammars(config.model, tokenizer, config.model_config.vocab_size, eos_token_ids, config.device)
        self._requests = Requests(scheduler, config.block_size)
        self._aborted: list[Sequence] = []
        self._in_flight: InFlightStep | None = None
        self._closed = False
        # Device memory and rank processes go in the same order whoever ends the engine: close(), the garbage
        # collector, or the interpreter's exit (CUDA graphs must go before NCCL, or its teardown hangs).
        self._release = weakref.finalize(self, _release, self.model_runner, self.ranks)
        self._arrivals = itertools.count()
        self.last_step_tokens = (0, 0)  # (prefill, decode) tokens computed by the latest step
        # Everything built so far (tens of thousands of blocks, the model, torch's own objects) lives
        # as long as the engine: keep it out of the garbage collector's full scans, which otherwise
        # stall a step for ~100 ms every few hundred steps.
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Abort unfinished requests, free the device memory, stop the tensor-parallel rank processes and
        free their shared memory. The engine takes no requests afterwards. Without close(), all of it goes
        when the engine is garbage-collected or the interpreter exits."""
        if self._closed:
            return
        self.abort_all()
        self._closed = True
        self._release()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        resumed_tokens: int = 0,
    ) -> str:
        """Queue a request (text or token ids); raise ValueError naming the bad field. Returns its id, which
        its outputs carry with the choice's `index` (SamplingParams.n).
        `resumed_tokens`: the prompt's last tokens are the output of an earlier attempt of this request
        (a failover), which presence and frequency penalties count as output. A request of n choices resumes
        each unfinished one alone, with `params.for_choice(index)`."""
        return self._enqueue(self._new_choices(prompt, params, request_id, resumed_tokens))

    def _new_choices(
        self, prompt: Prompt, params: SamplingParams | None, request_id: str | None, resumed_tokens: int = 0
    ) -> list[Sequence]:
        """A validated, not yet queued request: one sequence per choice."""
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        request_id = uuid.uuid4().hex if request_id is None else request_id
        if not isinstance(request_id, str) or not request_id or request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is empty, not a string or already in use")
        token_ids = validate_prompt(prompt, self.tokenizer, self.config, params, self.block_manager.num_blocks)
        if isinstance(resumed_tokens, bool) or not isinstance(resumed_tokens, int) or not (
            0 <= resumed_tokens < len(token_ids)
        ):
            raise ValueError(f"resumed_tokens must be an int in [0, {len(token_ids)}), got {resumed_tokens!r}")
        if resumed_tokens and params.n > 1:
            raise InvalidRequest("resumed_tokens", "must be 0 with n > 1: each choice resumes alone (for_choice)")
        output = token_ids[len(token_ids) - resumed_tokens :]
        matchers = self.grammars.matchers(params.structured_output, output, params.n)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return [
            Sequence(request_id=request_id, arrival=next(self._arrivals), token_ids=list(token_ids),
                     num_prompt_tokens=len(token_ids), params=params, seed=choice_seed(seed, index),
                     detokenizer=IncrementalDetokenizer(self.tokenizer) if params.stop else None,
                     resumed_tokens=resumed_tokens, matcher=matcher, index=index)
            for index, matcher in enumerate(matchers)
        ]

    def _enqueue(self, choices: list[Sequence]) -> str:
        if self._closed:
            raise RuntimeError("this LLMEngine is closed; create a new one")
        self._requests.add(choices)
        return choices[0].request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request (each of its choices) and free its blocks now; the final outputs come with the next step.
        False if unknown or finished."""
        seqs = self._requests.abort(request_id)
        for seq in seqs:
            self.scheduler.finish(seq)
            seq.finish_reason = "abort"
            seq.num_pending = 0  # what running steps sample for it is dropped
        self._aborted += seqs
        return bool(seqs)

    def abort_all(self) -> int:
        """Abort every unfinished request (a drain, or requests whose client is gone); returns how many."""
        return sum(self.abort(request_id) for request_id in list(self._requests))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then finish the previous one while the device runs the new one; returns
        every request's progress in the previous step (so the host's work overlaps the device's)."""
        outputs = [self._abort_output(seq) for seq in self._aborted]
        self._aborted.clear()
        batch = self.scheduler.schedule()
        self.heartbeat.step_started(batch.num_tokens if batch else 0)
        launched = self._launch(batch) if batch else None
        if self._in_flight is not None:
            outputs += self._process(self._in_flight)
        self._requests.release_held()  # the later choices of requests whose prompt is now cached
        if launched is not None and launched.pending is None:  # grammar rows: their masks follow the tokens just read
            mask = self.grammars.token_mask(launched.forward.seqs)
            launched.pending = self.model_runner.sample(launched.forward, mask)
        self._in_flight = launched
        self.heartbeat.step_ended()
        return outputs

    def _launch(self, batch: ScheduledBatch) -> InFlightStep:
        """Queue `batch` on the device and advance its sequences as if it were done: each sampling sequence
        counts its coming token as pending, so the next step can be planned before the token is known. A
        sequence whose coming token is its last by length does not: nothing is left to compute for it."""
        num_decode = batch.num_new_tokens.count(1)
        self.last_step_tokens = (batch.num_tokens - num_decode, num_decode)
        forward = self.model_runner.launch(batch)
        # A grammar row's mask needs the token the step before is sampling for it: such a step samples later.
        pending = None if any(seq.matcher is not None for seq in forward.seqs) else self.model_runner.sample(forward)
        chunks: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                chunks.append(seq)
        counted = [not finishes_by_length(seq, seq.num_tokens + 1) for seq in forward.seqs]
        for seq, counts in zip(forward.seqs, counted):
            if counts:
                seq.num_pending += 1
        return InFlightStep(forward, pending, counted, chunks)

    def _process(self, step: InFlightStep) -> list[RequestOutput]:
        """Append a finished step's tokens, publish newly full blocks, apply stops; one output per sampling
        request. Requests that finished or were aborted since its launch are skipped."""
        outputs: list[RequestOutput] = []
        commit = self.block_manager.commit
        eos_token_ids = self.eos_token_ids
        assert step.pending is not None, "every step is sampled before the next one launches"
        samples = zip(step.forward.seqs, step.counted, self.model_runner.wait(step.pending))
        held: list[tuple[Sequence, int]] = []  # rows a grammar holds, and their new tokens
        for seq, counted, (token_id, logprobs) in samples:
            if seq.is_finished:
                continue  # aborted, or it stopped the step before and its row here was wasted
            seq.token_ids.append(token_id)
            if seq.matcher is not None:
                held.append((seq, token_id))
            if counted:
                seq.num_pending -= 1
            commit(seq)  # now that every token it has computed is known
            new_logprobs = [] if logprobs is None else [logprobs]
            seq.logprobs += new_logprobs
            finish_reason = seq.finish_reason = check_stop(seq, token_id, len(seq.token_ids), eos_token_ids)
            if finish_reason is not None:
                seq.num_pending = 0  # the token the step now running samples for it is dropped
                self.scheduler.finish(seq)
                self._requests.report_final(seq)
            # Positional: this runs per request per step, and keyword construction costs twice as much.
            outputs.append(RequestOutput(seq.request_id, [token_id], finish_reason is not None, finish_reason,
                                         seq.num_prompt_tokens, seq.num_cached_tokens or 0, new_logprobs, seq.index))
        self.grammars.accept(held)
        for seq in step.chunks:
            if not seq.is_finished:
                commit(seq)
        return outputs

    def _abort_output(self, seq: Sequence) -> RequestOutput:
        """The final output of an aborted choice; the engine forgets its request after the last one."""
        self._requests.report_final(seq)
        return RequestOutput(seq.request_id, [], True, "abort", seq.num_prompt_tokens, seq.num_cached_tokens or 0,
                             [], seq.index)

    def take_kv_events(self) -> KVEvents:
        """Block hashes stored and evicted since the last call (for prefix-aware routing)."""
        return self.block_manager.take_events()

    def cached_kv_hashes(self) -> list[int]:
        """Every block hash the prefix cache holds now: the snapshot that `take_kv_events` deltas apply to."""
        return self.block_manager.cached_hashes()

    def stats(self) -> EngineStats:
        waiting = [*self.scheduler.waiting, *self._requests.held()]  # held n choices wait too
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(waiting),
            num_running_tokens=sum(seq.num_tokens for seq in self.scheduler.running),
            num_waiting_tokens=sum(seq.num_tokens for seq in waiting),
            num_kv_blocks_used=self.block_manager.num_used_blocks,
            num_kv_blocks_total=self.block_manager.num_blocks,
            num_prefix_hit_tokens=self.scheduler.num_prefix_hit_tokens,
            num_prompt_tokens=self.scheduler.num_prompt_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        **params: Any,
    ) -> Result | list[Result]:
        """Run prompts to completion. One prompt returns one dict (with n > 1: a list of n, by choice); a list
        returns a list of those, in input order.

        Sampling parameters come either as `sampling_params` (one, or one per prompt) or as
        keyword arguments (`max_tokens=100, temperature=0`).
        """
        single = not isinstance(prompts, (list, tuple)) or (bool(prompts) and isinstance(prompts[0], int))
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item, arg-type]
        if not batch:
            raise ValueError("prompts: no prompt given")
        per_prompt = self._sampling_params_per_prompt(sampling_params, params, len(batch))
        requests = self._add_all(batch, per_prompt)
        step_until_finished(self, [seq for choices in requests for seq in choices], use_tqdm)
        results = [result(choices, self.tokenizer) for choices in requests]
        return results[0] if single else results

    def default_sampling_params(self, **params: Any) -> SamplingParams:
        """`params` over the sampling defaults in force (the checkpoint's generation_config.json, unless the
        engine was built with generation_config="vllm"); what a request given no SamplingParams runs with."""
        return SamplingParams.from_kwargs(**{**self.config.sampling_defaults, **params})

    def _sampling_params_per_prompt(
        self, sampling_params: SamplingParams | list[SamplingParams] | None, params: dict[str, Any], n: int
    ) -> list[SamplingParams]:
        if sampling_params is not None and params:
            raise ValueError(f"pass sampling_params or keyword parameters, not both (got {', '.join(params)})")
        if sampling_params is None:
            return [self.default_sampling_params(**params)] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {n} prompts")
        return list(sampling_params)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[Sequence]]:
        """Validate every prompt, then queue them all: a bad one rejects the batch and queues nothing."""
        requests: list[list[Sequence]] = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            try:
                requests.append(self._new_choices(prompt, sp, None))
            except ValueError as e:
                raise (ValueError(f"prompts[{i}]: {e}") if len(prompts) > 1 else e) from None
        for choices in requests:
            self._enqueue(choices)
        return requests


def _eos_token_ids(config: EngineConfig, tokenizer: Tokenizer) -> frozenset[int]:
    """The model's EOS ids and its tokenizer's: either ends a request (unless it ignores EOS)."""
    return frozenset(config.model_config.eos_token_ids) | tokenizer.eos_token_ids


def _release(model_runner: ModelRunner, ranks: RankGroup | None) -> None:
    model_runner.close()
    if ranks is not None:
        ranks.close()
