"""Shared pieces of the GPU benchmarks: the random Qwen3-0.6B checkpoint and the measured ceilings."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.default_model import QWEN3_0_6B, write_random_qwen3  # noqa: E402
from engine.qwen_tokenizer import cache_root  # noqa: E402


def random_qwen3_0_6b() -> Path:
    """Qwen3-0.6B's shape with random bf16 weights, written once as a real safetensors checkpoint."""
    path = cache_root() / "random-qwen3-0.6b-bf16"
    if not (path / "config.json").is_file():
        write_random_qwen3(path, QWEN3_0_6B, dtype=torch.bfloat16)
    return path


def add_numerics_flags(parser: argparse.ArgumentParser) -> None:
    """The engine options that benchmarks compare runs across: the batch-invariant mode and the KV cache's dtype."""
    parser.add_argument("--batch-invariant", action="store_true", help="the engine's batch-invariant mode")
    parser.add_argument("--kv-cache-dtype", default="auto", help="'auto' (the model's dtype) or 'fp8'")


def numerics_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLMEngine's keyword arguments for the flags of `add_numerics_flags`."""
    return dict(batch_invariant=args.batch_invariant, kv_cache_dtype=args.kv_cache_dtype)


def timed(totals: dict[str, float], name: str, fn: Callable) -> Callable:
    """`fn`, adding the wall time of each call to totals[name]: a host-side profile of the engine's parts."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def time_cuda(fn, iters: int = 20, warmup: int = 3, before=None, hide_launch: bool = False) -> float:
    """Median seconds of `fn()` measured with CUDA events; `before()`, if given, runs untimed before each
    timed call (e.g. a barrier, so every rank starts together). The events time the host's launch work too
    when the GPU waits for it; `hide_launch` queues ~1 ms of GPU sleep before the start event, so that work
    overlaps the sleep and a kernel's own time is measured (a Python wrapper and a Triton launch cost 20-40 us)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        if hide_launch:
            torch.cuda._sleep(2_000_000)  # cycles
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def context_lengths(batch_size: int, context: str) -> list[int]:
    """Every sequence `context` tokens long, or, for "varied", lengths uniform in [128, 2048] as in the middle
    of nano-vLLM's workload (prompts of 100-1024 tokens plus up to 1024 generated)."""
    if context != "varied":
        return [int(context)] * batch_size
    g = torch.Generator().manual_seed(batch_size)
    return torch.randint(128, 2049, (batch_size,), generator=g).tolist()


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 4 GiB device-to-device copy, counting bytes read + written."""
    src = torch.randn(2**30, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def bf16_matmul_peak() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / time_cuda(lambda: a @ b)
