"""The decode matmuls at small batches: cuBLAS against kernels/skinny_matmul.py's configurations.

For each linear layer of Qwen3-0.6B (qkv, o_proj, gate_up, down, and the LM head) and M = 1, 4, 8, 16 rows:
cuBLAS's time, the skinny matmul's with the configuration the engine uses (`skinny_config`) and with the best one
of a sweep (block_n, block_k, split_k, warps, stages), against the weight's bytes over the measured copy
bandwidth. Times are CUDA-graph replays of 20 back-to-back launches (the way a decode step runs them), per launch.

    python bench/skinny_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import copy_bandwidth
from triton.runtime.errors import OutOfResources

from kernels.skinny_matmul import skinny_config, skinny_matmul

SHAPES = {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}


def graph_time(fn, launches: int = 20) -> float:
    """Seconds per launch of `fn` replayed from a CUDA graph of `launches` calls (median of 20 replays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return sorted(times)[len(times) // 2]


def configs(k: int, quick: bool):
    grid = itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4, 8), (4,) if quick else (4, 8), (3, 4))
    return [c for c in grid if k % (c[1] * c[2]) == 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 warps only")
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        floor_us = 1e6 * w.numel() * 2 / bandwidth
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, w)
            cublas_us = 1e6 * graph_time(lambda x=x, w=w: F.linear(x, w))
            best = (float("inf"), None)
            for bn, bk, sk, warps, stages in configs(k, args.quick):
                def run(x=x, w=w, bn=bn, bk=bk, sk=sk, warps=warps, stages=stages):
                    return skinny_matmul(x, w, (bn, bk, sk), warps, stages)
                try:
                    got = run()
                except OutOfResources:  # too much shared memory for its stages
                    continue
                assert (got.float() - want.float()).abs().max() < 0.1 * want.float().abs().max(), (name, m, bn, bk, sk)
                best = min(best, (1e6 * graph_time(run), (bn, bk, sk, warps, stages)))
            default_us = 1e6 * graph_time(lambda x=x, w=w: skinny_matmul(x, w))
            print(f"{name:8s} M={m:2d}: bytes/bandwidth {floor_us:5.2f} us, cuBLAS {cublas_us:5.2f} us, "
                  f"skinny {default_us:5.2f} us {skinny_config(n, k)}, best {best[0]:5.2f} us {best[1]}")


if __name__ == "__main__":
    main()
