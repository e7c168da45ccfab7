"""GPU time per kernel kind inside nano-vLLM's workload: where a step's time goes, and how much the GPU idles.

Runs the offline benchmark's workload (`offline_throughput.py`) and, with torch's profiler, records two
prefill steps and ten decode steps at each of a few batch sizes (the first steps at or below 256, 128 and
48 running sequences). Per window: wall time per step, GPU busy time per step (the rest is the GPU waiting
for the host), and busy time per kernel kind (attention, matmuls, each Triton kernel, the rest).
`--trace-dir` also writes each window's Chrome trace (chrome://tracing, Perfetto).

    python bench/kernel_breakdown.py [--model DIR] [--batches 256,128,48] [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import add_numerics_flags, numerics_kwargs
from offline_throughput import nano_vllm_workload, workload_engine
from torch.profiler import ProfilerActivity, profile

from engine import LLMEngine


def kernel_kind(name: str) -> str:
    if "paged_attention" in name:
        return "attention"
    if name.startswith(("nvjet", "sm90_", "cutlass")) or "gemm" in name or "splitKreduce" in name:
        return "matmul (cuBLAS)"
    if name.startswith("_"):  # our Triton kernels
        return name.removesuffix("_kernel").lstrip("_")
    if name.startswith("Memcpy") or name.startswith("Memset"):
        return "copies"
    return "other torch kernels"


def profile_steps(engine: LLMEngine, num_steps: int, label: str, trace_dir: Path | None) -> None:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    busy: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            busy[kernel_kind(event.name)] += event.device_time / 1e3  # ms
    total = sum(busy.values())
    print(f"{label}: {1e3 * wall / num_steps:.2f} ms per step, GPU busy {total / num_steps:.2f} ms "
          f"({total / (1e3 * wall):.0%}; the profiler adds some host time)")
    for kind, ms in sorted(busy.items(), key=lambda kv: -kv[1]):
        if ms / num_steps >= 0.005:
            print(f"    {ms / num_steps:8.3f} ms  {ms / total:5.1%}  {kind}")
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"{label.replace(' ', '_')}.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: random Qwen3-0.6B shape, bf16)")
    p.add_argument("--batches", default="256,128,48", help="decode batch sizes to profile, largest first")
    p.add_argument("--trace-dir", type=Path, help="also write each window's Chrome trace here")
    add_numerics_flags(p)
    args = p.parse_args()

    engine = workload_engine(args.model, **numerics_kwargs(args))
    for prompt, params in zip(*nano_vllm_workload(256, seed=0)):
        engine.add_request(prompt, params)
    engine.step()  # launches the first prefill step; the two profiled calls launch and run the next two
    profile_steps(engine, 2, "prefill steps", args.trace_dir)
    batches = sorted(map(int, args.batches.split(",")), reverse=True)
    while engine.has_unfinished() and batches:
        running = len(engine.scheduler.running)
        if running <= batches[0] and not engine.scheduler.waiting:
            batches.pop(0)
            profile_steps(engine, 10, f"decode batch {running}", args.trace_dir)
        else:
            engine.step()
    engine.close()


if __name__ == "__main__":
    main()
