"""TP=2 over NCCL on two GPUs: fp32 greedy equals Hugging Face and TP=1 (CUDA graphs on), a killed rank
fails the step or the process naming it, never hangs, and an engine left unclosed exits cleanly. Skipped
without two GPUs; run on the device machine's multi-GPU kinds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.default_model import QWEN3_0_6B, write_random_qwen3
from engine.tp.group import RANK_DEATH_EXIT_CODE
from tests.engine.test_gpu_runner import free_gpu_memory
from tests.engine.test_hf_parity import GREEDY, PROMPT_LENGTHS, VOCAB, hf_greedy, random_prompts, shared_prefix_prompts
from tests.engine.tp.test_lifecycle import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_tp2_fp32_greedy_equals_hf(tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    prompts = random_prompts(0, PROMPT_LENGTHS) + shared_prefix_prompts()[:3]
    expected = hf_greedy(model_dir, prompts)
    with LLMEngine(model_dir, device="cuda", dtype="float32", tensor_parallel_size=2, max_model_len=512,
                   max_num_seqs=32, max_num_batched_tokens=64, gpu_memory_utilization=0.2) as engine:
        assert engine.model_runner.graphs is not None and engine.model_runner.graphs.graphs
        for _ in range(2):  # the second pass hits the prefix cache
            results = engine.generate(prompts, GREEDY, use_tqdm=False)
            assert [r["token_ids"] for r in results] == expected
        assert engine.block_manager.num_used_blocks == 0
    free_gpu_memory()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_tp2_fp32_greedy_equals_tp1_with_cuda_graphs(tmp_path: Path) -> None:
    """On the real model shape, with graphs. In bf16 the two differ (bench/RESULTS.md): TP=2 adds two bf16
    row-parallel partial sums where TP=1 rounds one full sum, and random weights leave near-tied logits."""
    model_dir = write_random_qwen3(tmp_path / "qwen3-0.6b", QWEN3_0_6B, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (n,), generator=g).tolist() for n in (5, 100, 300, 700, 17, 1000)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outputs = []
    for tp in (1, 2):
        with LLMEngine(model_dir, dtype="float32", tensor_parallel_size=tp, max_model_len=2048, max_num_seqs=16,
                       gpu_memory_utilization=0.5) as engine:
            outputs.append([r["token_ids"] for r in engine.generate(prompts, params, use_tqdm=False)])
        free_gpu_memory()
    diverged = {i: first_divergence(a, b) for i, (a, b) in enumerate(zip(*outputs)) if a != b}
    assert not diverged, f"TP=2 differs from TP=1 (prompt: first differing output position): {diverged}"


KILLED_RANK_SCRIPT = """
import faulthandler, os, sys, time
from engine import LLMEngine, SamplingParams
engine = LLMEngine(sys.argv[1], device="cuda", dtype="float32", tensor_parallel_size=2, max_model_len=512,
                   num_kv_blocks=1024)
print(*[p.pid for p in engine.ranks.processes], flush=True)
faulthandler.dump_traceback_later(30, exit=True)  # a hang shows its threads in the test's failure message
for i in range(8):
    engine.add_request(list(range(1, 200)), SamplingParams(max_tokens=300, ignore_eos=True))  # fits 512
parent, deadline = os.getppid(), time.monotonic() + 120
while os.getppid() == parent and time.monotonic() < deadline:  # never outlive a killed test run
    engine.step()
"""


def test_killed_rank_fails_the_process_naming_it_without_hanging(tiny_checkpoint: Callable[..., Path]) -> None:
    """A dead rank's NCCL collectives must be aborted: the step fails naming the rank (RankDiedError), or,
    where NCCL cannot be unwound, the process exits with RANK_DEATH_EXIT_CODE saying so. Never a hang."""
    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RANK_SCRIPT, str(model_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    [pid] = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(2.0)  # generating, CUDA graphs replaying
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 15.0, stderr
    assert f"rank 1 (pid {pid})" in stderr, stderr
    assert proc.returncode in (1, RANK_DEATH_EXIT_CODE), stderr


EXIT_SCRIPT = """
import sys
from engine import LLMEngine
engine = LLMEngine(sys.argv[1], dtype="bfloat16", tensor_parallel_size=2, max_model_len=512, num_kv_blocks=256)
assert engine.model_runner.graphs is not None
print(*[p.pid for p in engine.ranks.processes], flush=True)
engine.generate([1, 2, 3], max_tokens=16, use_tqdm=False)
"""  # and ends without close()


def test_a_script_that_never_closes_its_engine_exits_cleanly_with_nccl(tiny_checkpoint: Callable[..., Path]) -> None:
    """At interpreter exit the CUDA graphs go before NCCL, as in close(): no hang, no std::terminate."""
    model_dir = tiny_checkpoint("tied-gqa4-hd32", vocab_size=VOCAB)
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(model_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and "terminate" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in done.stdout.split())
