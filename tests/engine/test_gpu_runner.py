"""The GPU path (Triton kernels, CUDA graphs, Philox sampling): fp32 greedy equals Hugging Face, bf16
greedy with CUDA graphs equals the eager run, and a step never waits for the GPU except for its tokens.
Skipped without a GPU; run on the device machine."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.default_model import QWEN3_0_6B, write_random_qwen3
from engine.pending_samples import PendingSamples
from tests.engine.test_hf_parity import GREEDY, PROMPT_LENGTHS, VOCAB, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fp32_greedy_equals_hf_on_gpu(tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    prompts = random_prompts(0, PROMPT_LENGTHS)
    expected = hf_greedy(model_dir, prompts)
    engine = LLMEngine(model_dir, device="cuda", dtype="float32", max_model_len=512, max_num_seqs=32,
                       gpu_memory_utilization=0.2)
    assert engine.model_runner.graphs is not None
    for _ in range(2):  # the second pass hits the prefix cache
        results = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert [r["token_ids"] for r in results] == expected
    assert engine.block_manager.num_used_blocks == 0
    del engine
    free_gpu_memory()


def free_gpu_memory() -> None:
    """Release deleted engines' GPU memory now (a KV cache holds most of gpu_memory_utilization)."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_bf16_cuda_graphs_equal_eager(tmp_path: Path, kv_cache_dtype: str) -> None:
    model_dir = write_random_qwen3(tmp_path / "qwen3-0.6b", QWEN3_0_6B, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (n,), generator=g).tolist() for n in (5, 100, 300, 700, 17, 1000)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outputs = []
    for enforce_eager in (True, False):
        engine = LLMEngine(model_dir, max_model_len=2048, max_num_seqs=16, enforce_eager=enforce_eager,
                           gpu_memory_utilization=0.5, kv_cache_dtype=kv_cache_dtype)
        outputs.append([r["token_ids"] for r in engine.generate(prompts, params, use_tqdm=False)])
        del engine
        free_gpu_memory()
    assert outputs[0] == outputs[1]


def test_a_step_waits_for_the_gpu_only_to_read_its_tokens(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No host-device synchronisation inside a step (torch's sync debug mode raises on any: .item(), a
    copy from pageable memory, nonzero...) except the event wait for the previous step's tokens. Covers
    prefill chunks joining decodes, greedy and sampled rows, suppression (min_tokens), seeds, logprobs and
    penalties."""
    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    wait = PendingSamples.results

    def results_waiting_allowed(self: PendingSamples) -> list:
        torch.cuda.set_sync_debug_mode(0)
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    with LLMEngine(model_dir, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=32,
                   max_num_batched_tokens=64, num_kv_blocks=256) as engine:
        engine.generate(random_prompts(1, [30, 90]), SamplingParams(max_tokens=8), use_tqdm=False)  # compile
        params = [GREEDY, SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True),
                  SamplingParams(temperature=1.0, top_p=0.9, seed=3, min_tokens=20, max_tokens=40),
                  SamplingParams(temperature=0.6, logprobs=2, max_tokens=40, ignore_eos=True),
                  SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=40,
                                 ignore_eos=True)]
        for prompt, p in zip(random_prompts(2, [20, 150, 70, 9, 33]), params):
            engine.add_request(prompt, p)
        engine.step()
        engine.step()
        monkeypatch.setattr(PendingSamples, "results", results_waiting_allowed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(30):
                if i == 10:  # a prefill joins the running decodes
                    engine.add_request(random_prompts(3, [100])[0], SamplingParams(temperature=0.8, max_tokens=5))
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        monkeypatch.undo()
        while engine.has_unfinished():
            engine.step()
    free_gpu_memory()


def test_no_kernel_compiles_after_start_up(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up (the KV sizing's profiling step, CUDA-graph capture) compiles every Triton kernel variant a
    run needs: a compile costs ~0.7 s, and batches of new shapes (prompt lengths, chunk sizes, block-table
    widths, prefix-cache hits, mixed prefill and decode) must not trigger one mid-run."""
    import triton

    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    compiled: list[str] = []

    def record(*args, **kwargs) -> bool:  # called before each compile; False: go on compiling
        compiled.append(kwargs["fn"].name)
        return False

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", record)
    with LLMEngine(model_dir, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=32,
                   max_num_batched_tokens=128, num_kv_blocks=256) as engine:  # a given cache size: still profiled
        compiled.clear()  # what start-up compiled
        params = [GREEDY, SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True),
                  SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=3, max_tokens=33),
                  SamplingParams(temperature=0.6, logprobs=2, max_tokens=17, ignore_eos=True),
                  SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=9)]
        prompts = random_prompts(4, [1, 3, 16, 17, 64, 200, 333, 48, 5, 130])
        for _ in range(2):  # the second pass hits the prefix cache
            engine.generate(prompts, [params[i % len(params)] for i in range(len(prompts))], use_tqdm=False)
    assert compiled == []
    free_gpu_memory()
