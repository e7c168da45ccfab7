"""Every kernel of one decode step at a fixed batch size: what a CUDA-graph replay launches and how long each
kernel runs, against the replay's wall time (the difference is the gaps between kernels).

Batch sizes 1, 8 and 64 at 1,024-token contexts by default; kernels are grouped by name, with their count per
step and mean time. Small batches are where launch gaps and latency-bound kernels, not bytes, set the time.

    python bench/decode_profile.py [--model DIR] [--batches 1,8,64] [--context 1024] [--batch-invariant]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from common import add_numerics_flags, numerics_kwargs, random_qwen3_0_6b, time_cuda
from decode_roofline import start_decoding
from torch.profiler import ProfilerActivity, profile

from engine import LLMEngine

REPLAYS = 10


def profile_replay(engine: LLMEngine, batch_size: int, context: int) -> None:
    ids = start_decoding(engine, batch_size, context, 64)
    graphs = engine.model_runner.graphs
    graph = graphs.graphs[graphs.padded_size(batch_size)]
    wall_us = 1e6 * time_cuda(graph.replay)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:60]].append(event.device_time)  # us
    busy_us = sum(sum(times) for times in kernels.values()) / REPLAYS
    count = sum(len(times) for times in kernels.values()) // REPLAYS
    print(f"batch {batch_size}: replay {wall_us:.1f} us, {count} kernels busy {busy_us:.1f} us "
          f"({busy_us / wall_us:.0%}), gaps {(wall_us - busy_us) / max(count, 1):.2f} us per kernel")
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        per_step = sum(times) / REPLAYS
        print(f"    {len(times) // REPLAYS:4d} x {sum(times) / len(times):6.2f} us = {per_step:7.1f} us  {name}")
    for i in ids:
        engine.abort(i)
    engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=1024)
    add_numerics_flags(p)
    args = p.parse_args()
    engine = LLMEngine(args.model or random_qwen3_0_6b(), max_model_len=2048, max_num_seqs=256,
                       max_num_batched_tokens=16384, **numerics_kwargs(args))
    for batch_size in map(int, args.batches.split(",")):
        profile_replay(engine, batch_size, args.context)


if __name__ == "__main__":
    main()
