"""KV cache sizing on a GPU, on CPU: torch.cuda's memory queries are faked, so the arithmetic and the wait for
memory another process still holds are checked exactly (tests/engine/test_gpu_memory_share.py runs them on a GPU).
And an FP8 cache's size and use."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.kv_cache import MAX_GPU_KV_BLOCKS, bytes_per_block, num_gpu_blocks

GIB = 2**30
MIB = 2**20
TOTAL = 100 * GIB
HELD = 2 * GIB  # this process's reserved memory: weights and the profiling run's leftovers
PEAK = 1 * GIB  # the largest step's activations
# 0.2 x 100 GiB - 2 GiB held - 1 GiB activations = 17 GiB of 1 MiB blocks.
EXPECTED_BLOCKS = 17 * 1024
NEEDED = 17 * GIB + PEAK  # what the engine is about to take: the cache, and the activations again


@pytest.fixture(scope="module")
def config(tiny_checkpoint: Callable[..., Path]) -> EngineConfig:
    """A config as on a GPU (its device is only passed to the faked queries)."""
    on_cpu = EngineConfig.create(tiny_checkpoint(), device="cpu", gpu_memory_utilization=0.2)
    return dataclasses.replace(on_cpu, device=torch.device("cuda", 0))


def fake_gpu(monkeypatch: pytest.MonkeyPatch, free_bytes: Iterator[int]) -> list[int]:
    """Fake a GPU of TOTAL bytes whose free memory reads as the successive values of `free_bytes`; this
    process holds HELD of it. Returns the list of values read so far."""
    reads: list[int] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        assert device == torch.device("cuda", 0)
        reads.append(next(free_bytes))
        return reads[-1], TOTAL

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: HELD)
    return reads


def constant(value: int) -> Iterator[int]:
    while True:
        yield value


@pytest.mark.parametrize("others_gib", [0, 40, 70])
def test_the_budget_ignores_other_processes_memory(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch, others_gib: int
) -> None:
    """Replicas sharing a GPU each get their share, whatever the others hold (the old rule, utilization x total
    - memory in use, gave the 70 GiB case nothing)."""
    reads = fake_gpu(monkeypatch, constant(TOTAL - HELD - others_gib * GIB))
    assert num_gpu_blocks(config, MIB, PEAK, wait_s=0.0) == EXPECTED_BLOCKS
    assert len(reads) == 1  # enough was free: no wait


def test_it_waits_until_another_process_frees_the_memory(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica replacing a killed one starts before the dead process's memory is back: it waits for it, and
    then gets the blocks the one it replaces had."""
    short = NEEDED - MIB
    reads = fake_gpu(monkeypatch, iter([short, short, NEEDED]))
    with caplog.at_level(logging.INFO, logger="engine.kv_cache"):
        assert num_gpu_blocks(config, MIB, PEAK, wait_s=30.0) == EXPECTED_BLOCKS
    assert reads == [short, short, NEEDED]
    [waiting] = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert "waiting up to 30 s for 18.00 GiB of GPU memory" in waiting


def test_memory_never_freed_is_an_error_naming_gpu_memory_utilization(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpu(monkeypatch, constant(5 * GIB))
    with pytest.raises(ValueError) as error:
        num_gpu_blocks(config, MIB, PEAK, wait_s=0.0)
    message = str(error.value)
    assert message.startswith("gpu_memory_utilization=0.2: this engine needs 18.00 GiB more of cuda:0")
    assert "only 5.00 GiB is free after 0 s" in message
    assert message.endswith("lower gpu_memory_utilization, or free the GPU")


def test_a_share_smaller_than_the_weights_gives_no_block_and_does_not_wait(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner then says to raise gpu_memory_utilization; waiting for memory would not help."""
    small = dataclasses.replace(config, gpu_memory_utilization=0.02)  # 2 GiB: what the weights hold already
    reads = fake_gpu(monkeypatch, constant(0))
    assert num_gpu_blocks(small, MIB, PEAK, wait_s=30.0) == 0
    assert len(reads) == 1


def test_a_tiny_model_on_a_large_gpu_gets_at_most_max_gpu_kv_blocks(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 KiB blocks (the embedded tiny model's) in 17 GiB would be 4.5M blocks, each a Python object in the block
    manager; the cache stops at MAX_GPU_KV_BLOCKS and asks only for the memory those need."""
    reads = fake_gpu(monkeypatch, constant(TOTAL - HELD))
    assert num_gpu_blocks(config, 4096, PEAK, wait_s=0.0) == MAX_GPU_KV_BLOCKS == 2**20
    assert len(reads) == 1  # enough is free: no wait


def test_an_fp8_cache_takes_one_byte_an_element_and_serves(tiny_checkpoint: Callable[..., Path]) -> None:
    """kv_cache_dtype="fp8": a block takes a quarter of a float32 block (half of a bf16 one on a GPU), so the same
    memory holds 4x (2x) the blocks. The engine serves from it, deterministically, close to the float32 cache: the
    float32 cache's greedy first token is among its five likeliest. (Exact agreement is no test on a tiny random
    model, whose top tokens lie within e4m3's few percent of each other.)"""
    engines = {kv: LLMEngine(tiny_checkpoint(), device="cpu", dtype="float32", kv_cache_dtype=kv, max_model_len=128)
               for kv in ("auto", "fp8")}
    runner = {kv: engine.model_runner for kv, engine in engines.items()}
    assert runner["fp8"].kv_cache.dtype == torch.float8_e4m3fn and runner["auto"].kv_cache.dtype == torch.float32
    sizes = {kv: bytes_per_block(r.model, engines[kv].config) for kv, r in runner.items()}
    assert sizes["auto"] == 4 * sizes["fp8"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    outputs = {kv: engine.generate([5, 77, 300, 12], greedy) for kv, engine in engines.items()}
    assert engines["fp8"].generate([5, 77, 300, 12], greedy)["token_ids"] == outputs["fp8"]["token_ids"]
    assert outputs["auto"]["token_ids"][0] in outputs["fp8"]["logprobs"][0]["top_logprobs"]
    for engine in engines.values():
        engine.close()
