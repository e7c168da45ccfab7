"""NCCL all-reduce between the host's GPUs: latency at the sizes a TP step reduces, and bus bandwidth.

A TP decode step of Qwen3-0.6B all-reduces [batch, hidden] bf16 twice per layer (attention output and
MLP down projection) plus once for the embedding: 57 reductions at TP >= 2. Each size is timed two
ways: eagerly (one launch per reduction) and as a CUDA graph of 57 reductions, the way decode replays
them. Bus bandwidth (nccl-tests' definition, 2 (n - 1) / n x bytes / time) at 256 MiB is the link's.

    python bench/allreduce.py [--world-size 2] [--hidden 1024] [--layers 28]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import time_cuda  # bench/common.py also puts the repo root on sys.path

from engine.tp.process_group import free_port

BATCH_SIZES = (1, 64, 256, 8192)


def time_events(fn, iters: int) -> float:
    """Median seconds of `fn()` by CUDA events, every rank starting together."""
    return time_cuda(fn, iters=iters, warmup=5, before=dist.barrier)


def run(rank: int, world_size: int, port: int, hidden: int, layers: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    per_step = 2 * layers + 1
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"world size {world_size}, {torch.cuda.get_device_name()}, NCCL {torch.cuda.nccl.version()}", flush=True)
    for batch in BATCH_SIZES:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
        eager_s = time_events(lambda x=x: dist.all_reduce(x), iters=50)
        say(f"[{batch:5d}, {hidden}] bf16 ({batch * hidden * 2 / 1024:7.0f} KiB): eager {eager_s * 1e6:7.1f} us",
            end="", flush=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                dist.all_reduce(x)
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(per_step):
                    dist.all_reduce(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph_s = time_events(graph.replay, iters=20) / per_step
        say(f", in a graph {graph_s * 1e6:7.1f} us; per decode step ({per_step} reductions) "
            f"{per_step * graph_s * 1e3:.3f} ms", flush=True)
    big = torch.randn(128 * 2**20, device="cuda", dtype=torch.bfloat16)  # 256 MiB
    big_s = time_events(lambda: dist.all_reduce(big), iters=10)
    bus_bw = 2 * (world_size - 1) / world_size * big.numel() * 2 / big_s
    say(f"256 MiB all-reduce: {big_s * 1e3:.3f} ms, bus bandwidth {bus_bw / 1e9:.1f} GB/s", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args()
    if args.world_size < 2:
        raise SystemExit(f"needs at least 2 GPUs, {torch.cuda.device_count()} visible")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the device machines keep NVLink multicast off
    mp.spawn(run, args=(args.world_size, free_port(), args.hidden, args.layers), nprocs=args.world_size)


if __name__ == "__main__":
    main()
