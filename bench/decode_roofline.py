"""Decode step time against the memory roofline, for batch sizes 1, 8, 64 and 256 at 1024-token contexts.

Roofline = (weight bytes + KV bytes read) / measured copy bandwidth: a decode step must read every
weight once and every cached K/V of every sequence once. Reports the engine's whole step (host
scheduling, graph replay, sampling, the token read-back) and the graph replay alone.

    python bench/decode_roofline.py [--model DIR] [--batch-invariant] [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_numerics_flags, copy_bandwidth, numerics_kwargs, random_qwen3_0_6b, time_cuda

from engine import LLMEngine, SamplingParams


def kv_bytes_per_token(engine: LLMEngine) -> int:
    m = engine.config.model_config
    return 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * engine.config.kv_cache_dtype.itemsize


def start_decoding(engine: LLMEngine, batch_size: int, context: int, max_tokens: int) -> list[int]:
    """Add `batch_size` requests of `context - 1` random prompt tokens and step until all of them decode."""
    g = torch.Generator().manual_seed(batch_size)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    ids = [engine.add_request(torch.randint(0, 10000, (context - 1,), generator=g).tolist(), params)
           for _ in range(batch_size)]
    started: set[str] = set()
    while not started.issuperset(ids):  # prefill everything first
        started.update(out.request_id for out in engine.step())
    for _ in range(3):
        engine.step()
    return ids


def measure(engine: LLMEngine, batch_size: int, context: int, steps: int) -> tuple[float, float | None]:
    """(seconds per engine step, seconds per graph replay) with `batch_size` sequences decoding."""
    ids = start_decoding(engine, batch_size, context, steps + 32)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - start) / steps
    graphs = engine.model_runner.graphs
    replay_s = None
    if graphs is not None and graphs.graphs:
        graph = graphs.graphs[graphs.padded_size(batch_size)]
        replay_s = time_cuda(graph.replay)  # re-runs the last step's inputs: same work, same slots
    for i in ids:
        engine.abort(i)
    engine.step()
    return step_s, replay_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated decode batch sizes")
    add_numerics_flags(p)
    args = p.parse_args()
    engine = LLMEngine(args.model or random_qwen3_0_6b(), max_model_len=2048, max_num_seqs=256,
                       max_num_batched_tokens=16384, **numerics_kwargs(args))
    bandwidth = copy_bandwidth()
    weight_bytes = sum(t.numel() * t.element_size() for t in engine.model_runner.model.parameters())
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weight_bytes / 2**30:.2f} GiB, "
          f"KV cache {engine.config.kv_cache_dtype}")
    for batch_size in map(int, args.batches.split(",")):
        step_s, replay_s = measure(engine, batch_size, args.context, args.steps)
        kv_bytes = batch_size * (args.context + args.steps // 2) * kv_bytes_per_token(engine)
        roofline_s = (weight_bytes + kv_bytes) / bandwidth
        replay = f"graph replay {replay_s * 1e3:.3f} ms ({replay_s / roofline_s:.2f}x)" if replay_s else ""
        print(f"batch {batch_size:3d}: roofline {roofline_s * 1e3:.3f} ms, engine step {step_s * 1e3:.3f} ms "
              f"({step_s / roofline_s:.2f}x roofline), {replay}")


if __name__ == "__main__":
    main()
