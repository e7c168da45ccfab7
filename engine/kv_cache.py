"""The KV cache: how many blocks fit, and the one tensor that holds them all."""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from engine.layers.attention import Attention, attention_backend

log = logging.getLogger(__name__)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, config: EngineConfig) -> int:
    layers = attention_layers(model)
    return 2 * len(layers) * config.block_size * layers[0].num_kv_heads * layers[0].head_dim * config.dtype.itemsize


def allocate_kv_cache(model: nn.Module, config: EngineConfig, num_blocks: int) -> torch.Tensor:
    """One [2, layers, blocks, block_size, kv_heads, head_dim] tensor; each layer gets its K and V views."""
    layers = attention_layers(model)
    shape = (2, len(layers), num_blocks, config.block_size, layers[0].num_kv_heads, layers[0].head_dim)
    # On CPU, untouched pages of an empty tensor cost no memory; every slot is written before it is read.
    alloc = torch.empty if config.device.type == "cpu" else torch.zeros
    cache = alloc(shape, dtype=config.dtype, device=config.device)
    for i, layer in enumerate(layers):
        layer.bind_kv_cache(cache[0, i], cache[1, i], config.max_model_len)
    return cache


def num_cpu_blocks(config: EngineConfig, block_bytes: int) -> int:
    """Enough blocks for every sequence at full length, capped by CPU_KV_CACHE_BYTES."""
    wanted = config.max_num_seqs * -(-config.max_model_len // config.block_size)
    return min(wanted, CPU_KV_CACHE_BYTES // block_bytes)


def num_gpu_blocks(config: EngineConfig, block_bytes: int, peak_activation_bytes: int) -> int:
    """Blocks that fit in gpu_memory_utilization of the GPU, after what is in use now (context, weights,
    other processes) and the activation peak of the largest step, measured by a profiling run."""
    free, total = torch.cuda.mem_get_info(config.device)
    in_use = total - free
    budget = total * config.gpu_memory_utilization - in_use - peak_activation_bytes
    num_blocks = int(budget // block_bytes)
    log.info(
        "KV budget: %.2f GiB = %.0f%% of %.1f GiB - %.2f GiB in use - %.2f GiB activation peak",
        budget / 2**30, 100 * config.gpu_memory_utilization, total / 2**30, in_use / 2**30,
        peak_activation_bytes / 2**30,
    )
    return num_blocks


def log_kv_cache(config: EngineConfig, num_blocks: int, block_bytes: int) -> None:
    log.info(
        "KV cache: %d blocks x %d tokens (%.1f MiB) on %s; attention backend: %s",
        num_blocks, config.block_size, num_blocks * block_bytes / 2**20, config.device,
        attention_backend(config.device, config.block_size),
    )
