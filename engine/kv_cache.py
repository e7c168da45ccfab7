"""The KV cache: how many blocks fit, and the one tensor that holds them all."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from engine.kv_scales import fp8_kv_scales
from engine.layers.attention import Attention, attention_backend
from engine.models.qwen import QwenDecoderLayer

log = logging.getLogger(__name__)
# How long a new engine waits for the memory its share needs while another process still holds it, and how
# often it looks: a killed process's memory is back within seconds, once the driver has torn down its context.
FREE_MEMORY_WAIT_S = 60.0
FREE_MEMORY_POLL_S = 0.5
# The most blocks a GPU cache gets: the block manager keeps a Python object per block, and a tiny model's share
# of a large GPU would otherwise be tens of millions of blocks (minutes and gigabytes of host memory to set up).
# 16.7M tokens at the default block size: a real model's share of any GPU today is far below it.
MAX_GPU_KV_BLOCKS = 1 << 20


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, config: EngineConfig) -> int:
    layers = attention_layers(model)
    layer = layers[0]
    return 2 * len(layers) * config.block_size * layer.num_kv_heads * layer.head_dim * config.kv_cache_dtype.itemsize


def allocate_kv_cache(model: nn.Module, config: EngineConfig, num_blocks: int) -> torch.Tensor:
    """One [2, layers, blocks, block_size, kv_heads, head_dim] tensor; each layer gets its K and V views (and, for an
    FP8 cache, its scales: engine/kv_scales.py)."""
    layers = attention_layers(model)
    shape = (2, len(layers), num_blocks, config.block_size, layers[0].num_kv_heads, layers[0].head_dim)
    # On CPU, untouched pages of an empty tensor cost no memory; every slot is written before it is read.
    alloc = torch.empty if config.device.type == "cpu" else torch.zeros
    cache = alloc(shape, dtype=config.kv_cache_dtype, device=config.device)
    decoder_layers = [m for m in model.modules() if isinstance(m, QwenDecoderLayer)]
    for i, (layer, decoder_layer) in enumerate(zip(layers, decoder_layers, strict=True)):
        scales = fp8_kv_scales(decoder_layer) if config.fp8_kv_cache else None
        layer.bind_kv_cache(cache[0, i], cache[1, i], config.max_model_len, config.batch_invariant, scales)
    return cache


def num_cpu_blocks(config: EngineConfig, block_bytes: int) -> int:
    """Enough blocks for every sequence at full length, capped by CPU_KV_CACHE_BYTES."""
    wanted = config.max_num_seqs * -(-config.max_model_len // config.block_size)
    return min(wanted, CPU_KV_CACHE_BYTES // block_bytes)


def num_gpu_blocks(
    config: EngineConfig, block_bytes: int, peak_activation_bytes: int, wait_s: float = FREE_MEMORY_WAIT_S
) -> int:
    """Blocks that fit in this engine's share of the GPU: gpu_memory_utilization of its total memory, less what
    this process holds now (weights, the profiling run's leftovers) and the largest step's activation peak.

    Other processes on the GPU do not count against the share (vLLM's rule): replicas sharing a GPU, and the
    replacement of a killed one, get the same count whoever else is there. Each process's CUDA context and
    library workspaces live in the 1 - gpu_memory_utilization left over. Waits up to `wait_s` for the GPU to
    have the cache and the activations free (see `_wait_for_free_memory`).
    """
    free, total = torch.cuda.mem_get_info(config.device)
    held = torch.cuda.memory_reserved(config.device)
    budget = total * config.gpu_memory_utilization - held - peak_activation_bytes
    num_blocks = min(max(int(budget // block_bytes), 0), MAX_GPU_KV_BLOCKS)
    log.info(
        "KV budget: %.2f GiB = %.0f%% of %.1f GiB - %.2f GiB this engine holds (weights) - %.2f GiB activation "
        "peak; other processes on the GPU do not count",
        budget / 2**30, 100 * config.gpu_memory_utilization, total / 2**30, held / 2**30,
        peak_activation_bytes / 2**30,
    )
    if num_blocks == MAX_GPU_KV_BLOCKS:
        log.info("KV cache capped at %d blocks (%.2f GiB of the budget): enough for any workload, and the block "
                 "manager's host bookkeeping stays small", MAX_GPU_KV_BLOCKS, MAX_GPU_KV_BLOCKS * block_bytes / 2**30)
    needed = num_blocks * block_bytes + peak_activation_bytes
    if num_blocks > 0 and free < needed:
        _wait_for_free_memory(config, needed, free, wait_s)
    return num_blocks


def _wait_for_free_memory(config: EngineConfig, needed_bytes: int, free_bytes: int, wait_s: float) -> None:
    """Poll until the GPU has `needed_bytes` free: a replica replacing a killed one on a shared GPU starts
    before the driver has reclaimed the dead process's memory. ValueError, as vLLM's start-up check, if the
    memory is still taken after `wait_s`: other processes hold more than the share leaves them."""
    gib = 2**30
    log.info(
        "waiting up to %.0f s for %.2f GiB of GPU memory (KV cache and activations) to be free, %.2f GiB now: "
        "another process still holds the rest (such as a replica being replaced, until the driver frees its memory)",
        wait_s, needed_bytes / gib, free_bytes / gib,
    )
    deadline = time.monotonic() + wait_s
    while free_bytes < needed_bytes and time.monotonic() < deadline:
        time.sleep(FREE_MEMORY_POLL_S)
        free_bytes = torch.cuda.mem_get_info(config.device)[0]
    if free_bytes < needed_bytes:
        raise ValueError(
            f"gpu_memory_utilization={config.gpu_memory_utilization:g}: this engine needs {needed_bytes / gib:.2f} "
            f"GiB more of {config.device} for its KV cache and activations, and only {free_bytes / gib:.2f} GiB "
            f"is free after {wait_s:.0f} s (other processes hold the rest); lower gpu_memory_utilization, or "
            "free the GPU"
        )


def log_kv_cache(config: EngineConfig, num_blocks: int, block_bytes: int) -> None:
    log.info(
        "KV cache: %d blocks x %d tokens (%.1f MiB, %s) on %s; attention backend: %s%s",
        num_blocks, config.block_size, num_blocks * block_bytes / 2**20,
        str(config.kv_cache_dtype).removeprefix("torch."), config.device,
        attention_backend(config.device, config.block_size, config.batch_invariant, config.fp8_kv_cache),
        "; batch-invariant numerics" if config.batch_invariant else "",
    )
